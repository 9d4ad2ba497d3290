"""The false-alarm totals of a nightly fuzz step: ``python .ci/false_alarms.py false_alarms.txt``.

The file holds every fuzz process's log, one section per ``--- seed N`` line. A section with
its summary is counted from it; one cut off before its summary (a process killed inside a
long compile) by its last ``count:`` line. Prints one line of totals, drawn cases included
(``--inputs-per-case`` runs each drawn case on several input draws).
"""
import re
import sys

text = open(sys.argv[1]).read()
keys = ("cases", "passed", "failed", "target errors", "harness errors", "not applicable")
total, cut, drawn = dict.fromkeys(keys, 0), 0, 0
for section in re.split(r"^--- seed \d+$", text, flags=re.M)[1:]:
    if re.search(r"^summary$", section, re.M):
        got = {k: sum(int(m) for m in re.findall(rf"^  {k if k != 'cases' else 'cases run'}\s+(\d+)", section, re.M))
               for k in keys}
        drawn += sum(int(m) for m in re.findall(r"^  drawn cases\s+(\d+)", section, re.M)) or got["cases"]
    else:
        lines = re.findall(r"^count: (.*)$", section, re.M)
        cut += 1
        got = {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", lines[-1] if lines else "")) else 0 for k in keys}
        m = re.search(r"(\d+) drawn", lines[-1] if lines else "")
        drawn += int(m.group(1)) if m else got["cases"]
    for k in keys:
        total[k] += got[k]
print(f"false alarms: {total['cases']} cases, {total['passed']} passed, {total['failed']} failed, "
      f"{total['target errors']} target errors, {total['harness errors']} harness errors, "
      f"{total['not applicable']} not applicable; {drawn} drawn cases" + (f" ({cut} process(es) cut off before their summary: "
      f"their last count line)" if cut else ""))
