"""``flex-oracle``: fuzz an attention implementation against the oracle, replay and show cases.

    flex-oracle fuzz [--target T] [--examples N] [--seed S] [--device D] [--out DIR] [--max-seconds T]
                     [--restart-every N]
    flex-oracle replay CASE.json [--target T] [--device D] [--property P]
    flex-oracle show CASE.json
    flex-oracle fault [...]          (the fault catalogue, properties/faults.py)

``fuzz`` draws cases with Hypothesis (``properties.strategies.flex_cases``) and
checks ``matches_oracle`` on each, plus one metamorphic property on about half
of them. It keeps going past failures and counts them; then Hypothesis shrinks
the first case of each distinct failure (property, kind, tensors), and each
shrunk case is saved as JSON with the command that replays it (each failure is
also written, unshrunk, as ``found-*.json`` the moment it is first seen, so that a
process killed before its report leaves it behind; the report removes it once the
shrunk record is saved). Every
``--restart-every`` cases it starts a new Hypothesis run (``run_seed``), and
on SIGTERM it ends the search and still prints the summary. ``--count-lines``
prints the running counts to stdout after every case, so that a log cut off
before its summary (a process killed inside a long compile, which no signal
handler can interrupt) still says what was run.

``replay`` exits 0 when the case passes, 1 on a mismatch or a target error,
125 when the target cannot run the case (so ``git bisect run`` skips that
commit) and 128 when the case cannot be replayed at all (a bad file; bisect
then stops).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["main", "build_parser", "EXIT_PASS", "EXIT_FAIL", "EXIT_NOT_APPLICABLE", "EXIT_CANNOT_REPLAY"]

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_NOT_APPLICABLE = 125  # git bisect run: skip this commit
EXIT_CANNOT_REPLAY = 128  # git bisect run: abort

DEFAULT_OUT = "flex-oracle-failures"
DEFAULT_EXAMPLES = {"cpu": 100, "cuda": 1000}
DEFAULT_SHRINK_SECONDS = {"cpu": 120.0, "cuda": 300.0}
# Within one Hypothesis run the later cases are often mutations of earlier ones; fresh runs
# every this many cases keep the search broad (measured on the CPU strategy, seeds 0-2: 25
# cases of one run held 15-20 distinct shapes, runs of 10 held 23-24, runs of 5 all 25).
DEFAULT_RESTART_EVERY = 10
FAILURE_FORMAT = 1


# --------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flex-oracle",
        description="Check FlexAttention implementations against a float64 oracle.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fuzz = sub.add_parser("fuzz", help="draw cases with Hypothesis, check them, shrink and save failures",
                          description="Fuzz a target against the float64 oracle. Exit 1 if anything failed.")
    fuzz.add_argument("--target", default="kernels", metavar="NAME|MODULE:FUNCTION",
                      help="kernels (default), kernels-dq-atomic, kernels-one-loop, kernels-one-loop-eager, "
                           "kernels-heads-in-loop, kernels-shifted, kernels-persistent, kernels-tma, gluon, "
                           "torch-compile, torch-eager, sdpa, or module:function")
    fuzz.add_argument("--examples", type=_positive_int, default=None, metavar="N",
                      help=f"cases to draw (default {DEFAULT_EXAMPLES['cpu']} on CPU, {DEFAULT_EXAMPLES['cuda']} on CUDA)")
    fuzz.add_argument("--seed", type=int, default=0, metavar="S", help="Hypothesis seed (default 0)")
    fuzz.add_argument("--device", default="auto", metavar="D", help="cpu, cuda, cuda:N or auto (default: CUDA if available)")
    fuzz.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                      help=f"where failing cases are saved (default {DEFAULT_OUT}/)")
    fuzz.add_argument("--max-seconds", type=float, default=None, metavar="T",
                      help="stop drawing new cases after T seconds (shrinking has its own budget)")
    fuzz.add_argument("--shrink-seconds", type=float, default=None, metavar="T",
                      help=f"time for shrinking all failures (default {DEFAULT_SHRINK_SECONDS['cpu']:g} s on CPU)")
    fuzz.add_argument("--max-failures", type=_positive_int, default=5, metavar="K",
                      help="distinct failures to shrink and save (default 5)")
    fuzz.add_argument("--properties", default="sample", metavar="WHICH",
                      help="sample (default: matches_oracle, plus one metamorphic property on about half "
                           "the cases), oracle (matches_oracle only), all, or a comma-separated list")
    fuzz.add_argument("--dtypes", default=None, metavar="LIST", help="comma-separated dtype names to draw")
    fuzz.add_argument("--exclude-options", default=None, metavar="LIST",
                      help="comma-separated kernel options never to draw (e.g. PRESCALE_QK while a bug there is open)")
    fuzz.add_argument("--exclude-mods", default=None, metavar="LIST",
                      help="comma-separated mask or score mod kinds never to draw (e.g. tanh_softcap,by_head)")
    fuzz.add_argument("--max-len", type=_positive_int, default=None, metavar="N", help="largest L and S")
    fuzz.add_argument("--max-batch-heads", type=_positive_int, default=None, metavar="N", help="largest B * Hq")
    fuzz.add_argument("--max-head-dim", type=_positive_int, default=None, metavar="N", help="largest E and Ev")
    fuzz.add_argument("--restart-every", type=_positive_int, default=DEFAULT_RESTART_EVERY, metavar="N",
                      help=f"start a new Hypothesis run (the next seed) every N cases, for variety "
                           f"(default {DEFAULT_RESTART_EVERY})")
    fuzz.add_argument("--inputs-per-case", type=_positive_int, default=1, metavar="K",
                      help="run each drawn case on K input draws (its own and K-1 fresh seeds and input "
                           "scales), checked with matches_oracle and counted as cases: they reuse the "
                           "drawn case's compiled kernels, which on a GPU take 90%% of a case's time "
                           "(default 1)")
    fuzz.add_argument("--quiet", action="store_true", help="no progress line")
    fuzz.add_argument("--count-lines", action="store_true",
                      help="print the running counts to stdout after every case ('count: ...')")
    fuzz.set_defaults(func=_cmd_fuzz)

    replay = sub.add_parser("replay", help="run one saved case; exit 0 pass, 1 fail, 125 not applicable",
                            description="Replay a case file (a saved failure or a bare case). Exit codes: "
                                        "0 pass, 1 mismatch or target error, 125 not applicable "
                                        "(git bisect run skips), 128 the file cannot be replayed.")
    replay.add_argument("case", metavar="CASE.json")
    replay.add_argument("--target", default=None, metavar="NAME|MODULE:FUNCTION",
                        help="default: the target the failure was found with, else kernels")
    replay.add_argument("--device", default="auto", metavar="D")
    replay.add_argument("--property", default=None, metavar="NAME",
                        help="default: the property that failed, else matches_oracle")
    replay.set_defaults(func=_cmd_replay)

    show = sub.add_parser("show", help="describe a case in words, with a picture of its mask")
    show.add_argument("case", metavar="CASE.json")
    show.add_argument("--rows", type=_positive_int, default=32, help="picture height in characters")
    show.add_argument("--cols", type=_positive_int, default=64, help="picture width in characters")
    show.set_defaults(func=_cmd_show)

    faults = _faults_module()
    if faults is not None:
        fault = sub.add_parser("fault", help="plant catalogued kernel faults and check that the properties catch them",
                               description=(faults.__doc__ or "").strip().splitlines()[0])
        faults.add_arguments(fault)
        fault.set_defaults(func=faults.command_main)
    return parser


def _faults_module():
    """``properties.faults`` (the fault catalogue) when this checkout has it."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__package__}.faults") is None:
        return None
    faults = importlib.import_module(f"{__package__}.faults")
    return faults if hasattr(faults, "add_arguments") and hasattr(faults, "command_main") else None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


# --------------------------------------------------------------------------
# shared helpers


def _device(name: str) -> str:
    """The device to run on; for the CPU, Triton's interpreter is chosen before any kernel loads."""
    import torch

    from .targets import best_device

    device = best_device() if name == "auto" else name
    if torch.device(device).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def _load(path: str):
    """(case, record) from a failure file or a bare case file."""
    from .case import FlexCase

    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "case" in data:
        return FlexCase.from_dict(data["case"]), data
    return FlexCase.from_dict(data), {}


def _replay_command(path: str, target: str, device: str, prop: str) -> str:
    return shlex.join(["flex-oracle", "replay", path, "--target", target, "--device", device, "--property", prop])


def _short(text: str, lines: int = 8) -> str:
    parts = text.splitlines()
    return "\n".join(parts[:lines] + ([f"... ({len(parts) - lines} more lines)"] if len(parts) > lines else []))


# --------------------------------------------------------------------------
# replay and show


def _cmd_replay(args) -> int:
    from .properties import PROPERTIES, evaluate
    from .targets import TARGETS, resolve_target

    try:
        case, record = _load(args.case)
    except (OSError, ValueError, TypeError) as exc:
        print(f"flex-oracle replay: cannot read {args.case}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_REPLAY
    prop = args.property or record.get("property", "matches_oracle")
    if prop not in PROPERTIES:
        print(f"flex-oracle replay: unknown property {prop!r}; known: {', '.join(PROPERTIES)}", file=sys.stderr)
        return EXIT_CANNOT_REPLAY
    target_name = args.target or record.get("target", "kernels")
    if ":" not in target_name and target_name not in TARGETS:
        print(f"flex-oracle replay: unknown target {target_name!r}; expected one of {', '.join(TARGETS)} "
              f"or module:function", file=sys.stderr)
        return EXIT_CANNOT_REPLAY
    device = _device(args.device)
    try:
        target = resolve_target(target_name)
    except (ImportError, ValueError, TypeError) as exc:
        # At some commits a user's target may not exist yet: nothing to judge there.
        print(f"flex-oracle replay: target {target_name!r} not available: {exc}", file=sys.stderr)
        return EXIT_NOT_APPLICABLE
    print(f"replaying {args.case}: {prop} on target {target.name} ({device})")
    print(case.describe())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = evaluate(prop, target, case, device)
    if outcome.status == "passed":
        print(f"PASS ({outcome.seconds:.2f} s)")
        return EXIT_PASS
    if outcome.status == "skipped":
        print(f"NOT APPLICABLE: {outcome.reason}")
        return EXIT_NOT_APPLICABLE
    if outcome.status == "error":
        print(f"CANNOT REPLAY (the harness raised):\n{outcome.message}")
        return EXIT_CANNOT_REPLAY
    label = "TARGET ERROR" if outcome.status == "target-error" else "FAIL"
    print(f"{label}:\n{outcome.message}")
    return EXIT_FAIL


def _cmd_show(args) -> int:
    try:
        case, record = _load(args.case)
    except (OSError, ValueError, TypeError) as exc:
        print(f"flex-oracle show: cannot read {args.case}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_REPLAY
    print(f"{args.case}")
    if record:
        print(f"failure: {record.get('property')} {record.get('status')} "
              f"({', '.join(record.get('tensors') or []) or record.get('error_type', '')}) "
              f"on target {record.get('target')} ({record.get('device')})"
              + ("; as the search first saw it, not shrunk" if record.get("shrunk") is False else ""))
    print(case.describe())
    print()
    print(case.mask_picture(max_rows=args.rows, max_cols=args.cols))
    if record:
        print()
        print(record.get("message", "").rstrip())
        print()
        print(f"replay: {record.get('command')}")
    return EXIT_PASS


# --------------------------------------------------------------------------
# fuzz


def _database():
    from hypothesis.database import InMemoryExampleDatabase

    class Database(InMemoryExampleDatabase):
        """In memory; ``demote()`` moves every saved failure to its secondary key.

        Hypothesis treats failures under the primary key as already shrunk and
        only replays them; under the secondary key it shrinks them.
        """

        def demote(self) -> None:
            for key in [k for k in self.data if not k.endswith((b".secondary", b".pareto"))]:
                for value in list(self.fetch(key)):
                    self.move(key, key + b".secondary", value)

    return Database()


def run_seed(seed: int, run: int) -> int:
    """The Hypothesis seed of the ``run``-th run of a fuzz with ``seed``: ``seed`` itself, then
    values no other base seed reaches soon (``seed + run`` made processes started with
    neighbouring seeds repeat each other's runs). For seed 0 it is ``run``, as it always was."""
    return seed if run == 0 else (seed * 1_000_003 + run) % 2**32


SLOWEST = 3  # slowest cases a fuzz summary lists


class _Stop(BaseException):
    """Out of search time: ends a Hypothesis run at once (not a test failure)."""


# The input scales a fresh draw takes: the strategy's (1 half the time, else 4, 0.25 or 2).
_VARIANT_STDS = (1.0, 1.0, 1.0, 4.0, 0.25, 2.0)


def input_variants(case, count: int) -> list:
    """``count`` copies of ``case`` with fresh inputs: another seed for q, k, v, dO and dLSE and an
    input scale drawn as the strategy draws it, both a function of the case (a replay or a shrink
    candidate gets the same draws). Nothing Triton specializes on changes (shapes, strides, dtype,
    mods and their tables, block mask, scale, options), so the drawn case's compiled kernels serve
    them all; the truth and the error model's allowances are computed anew for each."""
    digest = hashlib.sha1(case.to_json().encode()).digest()
    out = []
    for k in range(1, count + 1):
        h = hashlib.sha1(digest + k.to_bytes(4, "little")).digest()
        seed = int.from_bytes(h[:4], "little")
        std = _VARIANT_STDS[h[4] % len(_VARIANT_STDS)]
        out.append(case.replace(seed=seed, input_std=std))
    return out


_FAILURE_TYPES: dict = {}


def _failure_type(signature: tuple) -> type:
    """One exception class per kind of failure, so that Hypothesis shrinks each separately."""
    if signature not in _FAILURE_TYPES:
        name = "FlexFailure_" + hashlib.sha1(repr(signature).encode()).hexdigest()[:10]
        _FAILURE_TYPES[signature] = type(name, (AssertionError,), {"signature": signature})
    return _FAILURE_TYPES[signature]


@dataclass
class _Failure:
    signature: tuple
    first: object  # FlexCase
    first_extra: Optional[str]
    best: object
    best_extra: Optional[str]
    outcome: object  # Outcome of best
    seen: set = field(default_factory=set)  # distinct examples of the search that showed it
    found_path: Optional[str] = None  # the unshrunk record written when it was first seen


@dataclass
class _Fuzzer:
    target: object
    device: str
    strategy: object
    mode: str  # "sample" (matches_oracle plus a drawn metamorphic property) or "list" (all of props)
    props: tuple
    examples: int
    seed: int
    max_seconds: Optional[float]
    shrink_seconds: float
    max_failures: int
    quiet: bool
    # End the search at the first failure of any kind (the fault hunt asks only whether, and how
    # soon, something fails); first_failure_cases / first_failure_seconds say when it came.
    stop_at_first: bool = False
    # Start a new Hypothesis run (the next seed) every this many cases: late in one run
    # Hypothesis mostly mutates the examples it has, so a short budget sees more kinds of
    # case in several short runs than in one long one.
    restart_every: Optional[int] = None
    count_lines: bool = False
    # Each drawn case also runs on inputs_per_case - 1 fresh input draws (``input_variants``).
    inputs_per_case: int = 1
    drawn: int = 0  # Hypothesis examples of the search (cases_run counts every input draw)
    cache: dict = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    skip_reasons: Counter = field(default_factory=Counter)
    extra_stats: Counter = field(default_factory=Counter)
    failures: dict = field(default_factory=dict)
    raising: set = field(default_factory=set)
    shrinking: set = field(default_factory=set)
    phase: str = "search"
    cases_run: int = 0
    search_seconds: float = 0.0
    shrink_calls: int = 0
    deadline: float = float("inf")
    started: float = 0.0
    first_failure_cases: Optional[int] = None  # cases run up to and including the first failing one
    first_failure_seconds: Optional[float] = None  # search time until the first failure was seen
    # The slowest cases of the search, (seconds, one-line case, extra property): where a
    # nightly run's time goes (a case can outlast the search's deadline by minutes).
    slowest: list = field(default_factory=list)
    # A sticky device error (an illegal memory access, say) kills the process's CUDA context:
    # every later case would fail with it, so the search stops there. ``lost`` is the error's
    # first line; ``previous`` the case before (a kernel of it may be what faulted: launches
    # are asynchronous), saved beside the failure.
    lost: Optional[str] = None
    previous: Optional[tuple] = None
    lost_previous: Optional[tuple] = None
    # Where each failure is written the moment the search first sees it (``found-*.json``,
    # unshrunk), so that a process killed later (while shrinking, inside a long compile)
    # still leaves it behind; the report replaces it by the shrunk record. None: not written.
    out: Optional[str] = None
    device_name: Optional[str] = None

    # one example -------------------------------------------------------

    def check(self, case, extra):
        from .properties import evaluate

        names = (("matches_oracle",) + ((extra,) if extra else ())) if self.mode == "sample" else self.props
        outcomes = []
        for name in names:
            outcome = evaluate(name, self.target, case, self.device)
            outcomes.append(outcome)
            if not outcome.ok:
                break
        return outcomes

    def body(self, case, extra):
        """One Hypothesis example: the drawn case with its metamorphic extra, then its fresh
        input draws with matches_oracle alone. The draws are a function of the case, so a
        shrink candidate replays its own; a failing draw is saved as itself (a whole case)."""
        if self.phase == "search" and (case.to_json(), extra) not in self.cache:
            self.drawn += 1
        self._one(case, extra)
        for variant in input_variants(case, self.inputs_per_case - 1):
            self._one(variant, None)

    def _one(self, case, extra):
        key = (case.to_json(), extra)
        outcomes = self.cache.get(key)
        if outcomes is None:
            if time.perf_counter() > self.deadline:
                if self.phase == "search":
                    raise _Stop()
                return
            if self.phase == "search" and self.stop_at_first and self.failures:
                raise _Stop()
            began = time.perf_counter()
            outcomes = self.check(case, extra)
            self.cache[key] = outcomes
            if self.phase == "search":
                self._note_time(time.perf_counter() - began, case, extra)
                self.count(outcomes)
                lost = _device_lost(self.device, outcomes)
                if lost:
                    self.lost, self.lost_previous = lost, self.previous
                self.previous = (case, extra)
            else:
                self.shrink_calls += 1
                self.progress_shrink()
        failure = next((o for o in outcomes if not o.ok), None)
        if failure is None:
            return
        sig = failure.signature
        rec = self.failures.get(sig)
        if rec is None:
            if self.phase != "search":
                return  # a new kind met while shrinking another: not a finding of the search
            rec = self.failures[sig] = _Failure(sig, case, extra, case, extra, failure)
            self._save_found(rec)
            if self.first_failure_cases is None:
                self.first_failure_cases = self.cases_run
                self.first_failure_seconds = time.perf_counter() - self.started
        if self.phase == "search":
            rec.seen.add(key)
        if case.size_key() < rec.best.size_key():
            rec.best, rec.best_extra, rec.outcome = case, extra, failure
        if self.phase == "search" and self.lost:
            self.shrinking.add(sig)  # saved as it is: nothing can run on the device any more
            raise _Stop()
        if self.phase == "search":
            if sig in self.raising or (sig not in self.shrinking and len(self.shrinking) < self.max_failures):
                self.shrinking.add(sig)
                self.raising.add(sig)
                raise _failure_type(sig)(failure.message)
            return
        if sig in self.shrinking:
            raise _failure_type(sig)(failure.message)

    def _save_found(self, rec) -> None:
        if self.out is None or self.target is None:
            return
        os.makedirs(self.out, exist_ok=True)
        rec.found_path = _write_record(self, rec, rec.first, rec.outcome, "found")
        o = rec.outcome
        if self.count_lines or not self.quiet:
            what = ", ".join(o.tensors) if o.status == "failed" else o.error_type
            print(f"found: {o.property} {o.status} ({what}) at case {self.cases_run}, "
                  f"saved unshrunk as {rec.found_path}", flush=True)

    def _note_time(self, seconds: float, case, extra) -> None:
        c = case
        line = (f"B={c.B} Hq={c.Hq} Hkv={c.Hkv} L={c.L} S={c.S} E={c.E} Ev={c.Ev} {c.dtype}"
                + (" backward" if c.backward else ""))
        self.slowest = sorted(self.slowest + [(seconds, line, extra)], key=lambda t: -t[0])[:SLOWEST]

    def count(self, outcomes):
        self.cases_run += 1
        main = outcomes[0]
        worst = next((o for o in outcomes if not o.ok), None)
        status = worst.status if worst is not None else ("skipped" if main.status == "skipped" else "passed")
        self.stats[status] += 1
        if main.status == "skipped":
            self.skip_reasons[main.reason] += 1
        for o in outcomes[1:]:
            self.extra_stats[(o.property, o.status)] += 1
        if self.count_lines:
            s = self.stats
            print(f"count: {self.cases_run} cases, {s['passed']} passed, {s['failed']} failed, "
                  f"{s['target-error']} target errors, {s['error']} harness errors, "
                  f"{s['skipped']} not applicable, {self.drawn} drawn", flush=True)
        self.progress()

    # progress ----------------------------------------------------------

    def _line(self) -> str:
        s = self.stats
        per = (time.perf_counter() - self.started) / max(1, self.cases_run)
        return (f"[{self.cases_run:>5}/{self.examples}] {s['passed']} passed, {s['failed']} failed, "
                f"{s['target-error']} target errors, {s['skipped']} skipped"
                + (f", {s['error']} harness errors" if s["error"] else "") + f" | {per:.2f} s/case")

    def progress(self):
        if self.quiet:
            return
        if sys.stderr.isatty():
            print("\r" + self._line(), end="", file=sys.stderr, flush=True)
        elif self.cases_run % max(1, self.examples // 10) == 0 or self.cases_run == self.examples:
            print(self._line(), file=sys.stderr, flush=True)

    def progress_shrink(self):
        if self.quiet or not sys.stderr.isatty():
            return
        print(f"\rshrinking: {self.shrink_calls} cases tried", end="", file=sys.stderr, flush=True)

    # the Hypothesis runs -----------------------------------------------

    def _test(self):
        from hypothesis import strategies as st

        from .properties import METAMORPHIC

        extras = st.one_of(st.none(), st.sampled_from(METAMORPHIC)) if self.mode == "sample" else st.none()
        fuzzer = self

        def flex_oracle_fuzz(case, extra):
            fuzzer.body(case, extra)

        return flex_oracle_fuzz, dict(case=self.strategy, extra=extras)

    def run(self):
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hseed

        self.started = time.perf_counter()
        self.deadline = self.started + self.max_seconds if self.max_seconds else float("inf")
        db = _database()
        fn, strategies = self._test()
        common = dict(database=db, deadline=None, suppress_health_check=list(HealthCheck),
                      verbosity=Verbosity.quiet, print_blob=False)
        run, idle = 0, 0
        # Search: each run stops at the first new kind of failure (saved in db), so restart
        # with the next seed until the budget of examples or time is spent. Every run begins
        # with the simplest case, seen before: ask for one more than what is left.
        while self.cases_run < self.examples and time.perf_counter() < self.deadline and idle < 3:
            before = self.cases_run
            self.raising = set()
            # settings after seed: @seed alone would switch the example database off,
            # and the shrink phase below replays the failures saved there.
            left = -(-(self.examples - self.cases_run) // self.inputs_per_case)
            if self.restart_every:
                left = min(left, self.restart_every)
            test = settings(max_examples=left + (1 if run else 0),
                            phases=[Phase.generate], report_multiple_bugs=False,
                            **common)(hseed(run_seed(self.seed, run))(given(**strategies)(fn)))
            run += 1
            try:
                test()
            except _Stop:
                break
            except Exception:
                pass
            if self.stop_at_first and self.failures:
                break
            idle = idle + 1 if self.cases_run == before else 0
        self.search_seconds = time.perf_counter() - self.started
        if not self.quiet and sys.stderr.isatty():
            print("\r" + self._line(), file=sys.stderr, flush=True)
        if not self.failures:
            return
        if self.lost:
            if not self.quiet:
                print(f"the device's context is lost ({self.lost}): no shrinking", file=sys.stderr, flush=True)
            return
        # Shrink: Hypothesis replays the saved failures from db and shrinks each kind.
        self.phase = "shrink"
        self.deadline = time.perf_counter() + self.shrink_seconds
        if not self.quiet:
            print(f"shrinking {len(self.shrinking)} failure(s) (at most {self.shrink_seconds:g} s)",
                  file=sys.stderr, flush=True)
        db.demote()
        test = settings(max_examples=max(1000, self.examples), phases=[Phase.reuse, Phase.shrink],
                        report_multiple_bugs=True, **common)(given(**strategies)(fn))
        try:
            test()
        except Exception:
            pass
        if not self.quiet and sys.stderr.isatty():
            print(file=sys.stderr)


def _cmd_fuzz(args) -> int:
    import torch

    from .properties import METAMORPHIC, PROPERTIES
    from .strategies import flex_cases
    from .targets import resolve_target

    device = _device(args.device)
    kind = torch.device(device).type
    try:
        target = resolve_target(args.target)
    except (ImportError, ValueError, TypeError) as exc:
        print(f"flex-oracle fuzz: {exc}", file=sys.stderr)
        return 2
    if args.properties == "sample":
        mode, props = "sample", ("matches_oracle",) + METAMORPHIC
    elif args.properties == "oracle":
        mode, props = "list", ("matches_oracle",)
    elif args.properties == "all":
        mode, props = "list", tuple(PROPERTIES)
    else:
        props = tuple(p.strip() for p in args.properties.split(",") if p.strip())
        unknown = [p for p in props if p not in PROPERTIES]
        if unknown or not props:
            print(f"flex-oracle fuzz: unknown properties {unknown}; known: {', '.join(PROPERTIES)}", file=sys.stderr)
            return 2
        mode = "list"
    # A narrow target's own bounds first (the head dims, dtypes and tiles it covers), so that
    # its draws are cases it can run; the options below override them.
    bounds = dict(target.draw_bounds)
    if args.max_len:
        bounds["max_len"] = args.max_len
    if args.max_batch_heads:
        bounds["max_batch_heads"] = args.max_batch_heads
        bounds["max_heads"] = min(args.max_batch_heads, 16)
    if args.max_head_dim:
        bounds["max_head_dim"] = args.max_head_dim
    if args.dtypes:
        bounds["dtypes"] = tuple(d.strip() for d in args.dtypes.split(","))
    if args.exclude_mods:
        bounds["exclude_mods"] = tuple(o.strip() for o in args.exclude_mods.split(",") if o.strip())
    if args.exclude_options:
        bounds["exclude_options"] = tuple(o.strip() for o in args.exclude_options.split(",") if o.strip())
    try:
        strategy = flex_cases(device=device, **bounds)
    except Exception as exc:
        print(f"flex-oracle fuzz: {exc}", file=sys.stderr)
        return 2
    examples = args.examples or DEFAULT_EXAMPLES["cuda" if kind == "cuda" else "cpu"]
    shrink_seconds = args.shrink_seconds if args.shrink_seconds is not None else \
        DEFAULT_SHRINK_SECONDS["cuda" if kind == "cuda" else "cpu"]
    where = "CUDA" if kind == "cuda" else "CPU, Triton interpreter" if target.name == "kernels" else "CPU"
    prop_text = "matches_oracle plus a sample of metamorphic properties" if mode == "sample" else ", ".join(props)
    print(f"flex-oracle fuzz: target {target.name} on {device} ({where}), {examples} examples, seed {args.seed}")
    print(f"properties: {prop_text}")
    sys.stdout.flush()

    fuzzer = _Fuzzer(target=target, device=device, strategy=strategy, mode=mode, props=props,
                     examples=examples, seed=args.seed, max_seconds=args.max_seconds,
                     shrink_seconds=shrink_seconds, max_failures=args.max_failures, quiet=args.quiet,
                     restart_every=args.restart_every, count_lines=args.count_lines,
                     inputs_per_case=args.inputs_per_case, out=args.out, device_name=device)
    previous = _stop_on_sigterm(fuzzer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fuzzer.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _report(fuzzer, args, device)


# CUDA errors after which the context is unusable (every later call fails with them).
_STICKY = re.compile(r"illegal memory access|unspecified launch failure|misaligned address|"
                     r"illegal instruction|device-side assert|hardware stack error|invalid program counter",
                     re.I)


def _device_lost(device: str, outcomes) -> Optional[str]:
    """The first line of a sticky device error among ``outcomes``' errors, else None. On a
    CUDA device an error without the words is confirmed by a probe (a tiny computation)."""
    errors = [o for o in outcomes if o.status in ("target-error", "error")]
    for o in errors:
        m = _STICKY.search(o.message or "")
        if m:
            line = next((ln for ln in (o.message or "").splitlines() if _STICKY.search(ln)), m.group(0))
            return line.strip()
    if errors and str(device).startswith("cuda"):
        import torch

        try:
            torch.ones(1, device=device).add_(1).item()
        except Exception as exc:  # the context is gone
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def _stop_on_sigterm(fuzzer: _Fuzzer):
    """On SIGTERM (``timeout``, a CI job's limit) end the search at once and still print the
    summary: the counts of a long run are what a nightly job reports. Returns the previous
    handler, or None where signals cannot be set (not the main thread)."""
    def stop(signum, frame):
        fuzzer.deadline = 0.0
        if fuzzer.phase == "search":
            raise _Stop()

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


def _write_record(fz: _Fuzzer, rec: _Failure, case, outcome, kind: str) -> str:
    """Write one failure record (``kind`` "failure": shrunk, or "found": as first seen) under
    ``fz.out``; returns its path. The record replays with ``flex-oracle replay``."""
    prop = outcome.property
    digest = hashlib.sha1(case.to_json().encode()).hexdigest()[:10]
    path = os.path.join(fz.out, f"{kind}-{prop}-{digest}.json")
    device = fz.device_name or fz.device
    record = {
        "flex_oracle_failure": FAILURE_FORMAT,
        "property": prop,
        "status": outcome.status,
        "tensors": list(outcome.tensors),
        "error_type": outcome.error_type,
        "target": fz.target.name,
        "device": device,
        "message": outcome.message,
        "command": _replay_command(path, fz.target.name, device, prop),
        "case": case.to_dict(),
        "first_seen": rec.first.to_dict(),
        "occurrences": len(rec.seen),
        "shrunk": kind == "failure",
        "fuzz": {"seed": fz.seed, "examples": fz.examples},
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def _report(fz: _Fuzzer, args, device: str) -> int:
    s = fz.stats
    per = fz.search_seconds / max(1, fz.cases_run)
    print()
    print("summary")
    print(f"  cases run       {fz.cases_run} in {fz.search_seconds:.1f} s ({per:.2f} s per case)")
    if fz.inputs_per_case > 1:
        print(f"  drawn cases     {fz.drawn}, each on up to {fz.inputs_per_case} input draws")
    print(f"  passed          {s['passed']}")
    print(f"  failed          {s['failed']}")
    print(f"  target errors   {s['target-error']}")
    if s["error"]:
        print(f"  harness errors  {s['error']} (a bug of flex-oracle itself)")
    print(f"  not applicable  {s['skipped']}")
    for reason, n in fz.skip_reasons.most_common():
        print(f"    {n:>5}  {reason}")
    if fz.extra_stats:
        runs = Counter()
        for (prop, status), n in fz.extra_stats.items():
            runs[status] += n
        total = sum(runs.values())
        print(f"  metamorphic     {total} check{'' if total == 1 else 's'}: {runs['passed']} passed, "
              f"{runs['failed'] + runs['target-error'] + runs['error']} failed, {runs['skipped']} not applicable")
        for prop in sorted({p for p, _ in fz.extra_stats}):
            row = {st: fz.extra_stats[(prop, st)] for st in ("passed", "failed", "target-error", "skipped", "error")}
            print(f"    {prop}: " + ", ".join(f"{n} {st}" for st, n in row.items() if n))
    if fz.shrink_calls:
        print(f"  shrinking       {fz.shrink_calls} cases tried")
    for k, (sec, line, extra) in enumerate(fz.slowest):
        print(f"  {'slowest' if k == 0 else '':<15} {sec:6.1f} s  {line}" + (f" + {extra}" if extra else ""))

    if not fz.failures:
        print("no failures")
        return EXIT_PASS if not (s["failed"] or s["target-error"] or s["error"]) else EXIT_FAIL
    os.makedirs(args.out, exist_ok=True)
    saved = []
    for rec in fz.failures.values():
        if rec.signature not in fz.shrinking:
            continue
        path = _write_record(fz, rec, rec.best, rec.outcome, "failure")
        if rec.found_path and rec.found_path != path and os.path.exists(rec.found_path):
            os.remove(rec.found_path)  # superseded by the shrunk record
        command = _replay_command(path, fz.target.name, fz.device_name or fz.device, rec.outcome.property)
        saved.append((rec, path, command))
    before = None
    if fz.lost and fz.lost_previous is not None:
        case, extra = fz.lost_previous
        digest = hashlib.sha1(case.to_json().encode()).hexdigest()[:10]
        path = os.path.join(args.out, f"before-lost-context-{digest}.json")
        prop = extra or "matches_oracle"
        command = _replay_command(path, fz.target.name, device, prop)
        with open(path, "w") as f:
            json.dump({"flex_oracle_failure": FAILURE_FORMAT, "property": prop, "status": "suspect",
                       "tensors": [], "error_type": None, "target": fz.target.name, "device": device,
                       "message": f"the case run just before the device's context was lost ({fz.lost}); "
                                  "it passed, but a kernel of it may be what faulted",
                       "command": command, "case": case.to_dict(), "first_seen": case.to_dict(),
                       "occurrences": 1, "fuzz": {"seed": fz.seed, "examples": fz.examples}},
                      f, indent=2, sort_keys=True)
            f.write("\n")
        before = command
    unsaved = len(fz.failures) - len(saved)
    print()
    print(f"{len(fz.failures)} distinct failure(s); {len(saved)} shrunk and saved in {args.out}/"
          + (f" ({unsaved} more not shrunk, saved as first seen (found-*.json): raise --max-failures)"
               if unsaved else ""))
    for k, (rec, path, command) in enumerate(saved, 1):
        o = rec.outcome
        what = ", ".join(o.tensors) if o.status == "failed" else o.error_type
        print()
        print(f"{k}. {o.property}: {o.status} ({what}), seen in {len(rec.seen)} case(s)")
        c = rec.best
        print(f"   shrunk to B={c.B} Hq={c.Hq} Hkv={c.Hkv} Bk={c.Bk} L={c.L} S={c.S} E={c.E} Ev={c.Ev} "
              f"{c.dtype} {c.layout}")
        for line in _short(o.message).splitlines():
            print(f"   {line}")
        print(f"   replay: {command}")
        print(f"   show:   {shlex.join(['flex-oracle', 'show', path])}")
    if fz.lost:
        print()
        print(f"the device's context was lost: {fz.lost}")
        print("   The search stopped there (every later case would fail with it) and nothing was shrunk.")
        print("   Kernels run asynchronously, so the fault is in the case above or in a kernel of the case")
        print("   run before it" + (f", saved as well:\n   replay: {before}" if before else " (none: it was the first)."))
        print("   Replay each in a fresh process; CUDA_LAUNCH_BLOCKING=1 names the kernel that faults.")
    return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
