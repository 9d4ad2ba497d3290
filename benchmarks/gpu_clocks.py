"""The GPU's SM clock, power and temperature while a benchmark times, sampled by ``nvidia-smi``.

On the H200 at S=1k two runs of the same cases disagreed by up to 1.5x on single ratios,
both ours and PyTorch's, and one run's rounds agreed with each other while disagreeing with
the other run (docs/PERFORMANCE.md, seventeenth session). A clock that drops while a case is
timed (power or thermal capping, a neighbour on the same board) would explain that and is
invisible in the times alone: ``ClockSampler`` runs ``nvidia-smi --query-gpu=... --loop-ms=N`` in
the background, and ``window(t0, t1)`` summarizes the samples taken between two
``time.monotonic()`` readings (``benchmarks/bench.py`` records one per case).

Without ``nvidia-smi`` (or with one that refuses every query) the sampler is unavailable,
``error`` says why, and ``window`` returns None: the benchmark runs as before.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from typing import Optional

# Always queried; the active clock-event (throttle) reasons are added where the driver knows
# one of these names (renamed from clocks_throttle_reasons to clocks_event_reasons in 2023).
FIELDS = ("clocks.sm", "power.draw", "temperature.gpu")
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
# A window whose lowest SM clock is under this share of the run's highest sample is a drop.
DROP_SHARE = 0.9


def _number(text: str) -> Optional[float]:
    text = text.strip()
    try:
        return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


class ClockSampler:
    """Samples every ``period_ms`` until ``stop()``; ``device`` is what ``nvidia-smi -i`` takes
    (an index, a UUID such as ``GPU-...``, or a PCI bus id)."""

    def __init__(self, device: str = "0", period_ms: int = 100, smi: str = "nvidia-smi"):
        self.samples: list = []  # (monotonic seconds, sm MHz, power W, temperature C, reasons bitmask)
        self.fields: Optional[tuple] = None
        self.error: Optional[str] = None
        self._proc = None
        self._lock = threading.Lock()
        path = shutil.which(smi)
        if path is None:
            self.error = f"{smi} not found"
            return
        for extra in [(f,) for f in REASON_FIELDS] + [()]:
            fields = FIELDS + extra
            try:
                probe = subprocess.run([path, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                        "-i", str(device)], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as e:
                self.error = f"{smi}: {type(e).__name__}: {e}"
                return
            if probe.returncode == 0 and probe.stdout.strip():
                self.fields = fields
                break
            self.error = f"{smi} refused {','.join(fields)}: {(probe.stderr or probe.stdout).strip()[:200]}"
        if self.fields is None:
            return
        self.error = None
        self._proc = subprocess.Popen(
            [path, f"--query-gpu={','.join(self.fields)}", "--format=csv,noheader,nounits", "-i", str(device),
             f"--loop-ms={int(period_ms)}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self._thread = threading.Thread(target=self._read, name="gpu-clocks", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return self._proc is not None

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = [_number(p) for p in line.split(",")]
            if len(parts) != len(self.fields) or parts[0] is None:
                continue
            sample = (time.monotonic(), parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else None)
            with self._lock:
                self.samples.append(sample)

    def peak_sm_mhz(self) -> Optional[float]:
        with self._lock:
            return max((s[1] for s in self.samples), default=None)

    def window(self, t0: float, t1: float) -> Optional[dict]:
        """The samples taken between ``t0`` and ``t1`` (``time.monotonic()``): the SM clock's lowest,
        median and highest, the highest power and temperature, the reasons bitmasks seen
        (non-zero ones, as hex), and whether the lowest clock fell under DROP_SHARE of the
        highest sample of the run so far. None without samples there."""
        with self._lock:
            inside = [s for s in self.samples if t0 <= s[0] <= t1]
            peak = max((s[1] for s in self.samples), default=None)
        if not inside:
            return None
        sm = [s[1] for s in inside]
        power = [s[2] for s in inside if s[2] is not None]
        temp = [s[3] for s in inside if s[3] is not None]
        reasons = sorted({int(s[4]) for s in inside if s[4]})
        return {
            "samples": len(inside),
            "sm_mhz_min": min(sm), "sm_mhz_median": statistics.median(sm), "sm_mhz_max": max(sm),
            "run_peak_sm_mhz": peak,
            "power_w_max": max(power) if power else None,
            "temperature_c_max": max(temp) if temp else None,
            "reasons": [hex(r) for r in reasons],
            "dropped": bool(peak) and min(sm) < DROP_SHARE * peak,
        }

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def describe(window: Optional[dict]) -> str:
    """One short phrase for a log line: ``SM 1980 MHz (1755-1980), 512 W``."""
    if not window:
        return "no clock samples"
    text = (f"SM {window['sm_mhz_median']:.0f} MHz ({window['sm_mhz_min']:.0f}-{window['sm_mhz_max']:.0f})"
            + (f", {window['power_w_max']:.0f} W" if window["power_w_max"] is not None else "")
            + (f", reasons {'/'.join(window['reasons'])}" if window["reasons"] else ""))
    return text + (" DROPPED" if window["dropped"] else "")
