#!/bin/bash
PYTHONPATH=. timeout 220 python3 -m pytest -m gpu -n 12 -q -p no:cacheprovider --ignore tests/test_gluon_probe.py --ignore tests/test_gluon_probe_bwd.py 2>&1 | grep -v PytestBenchmarkWarning | grep -v "warner(" | tail -15 > $OUT/gpu-subset.txt
cat $OUT/gpu-subset.txt
