#!/usr/bin/env bash
# Every benchmark behind docs/RESULTS.md, one after another (they must not share the
# CPU: concurrent runs distort each other's timings). About 75 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
mkdir -p out
$PY toy2d.py --data 8gaussians --budget 300 --eval-interval 20 | tee out/toy2d_8gaussians.log
$PY toy2d.py --data checkerboard --budget 300 --eval-interval 20 | tee out/toy2d_checkerboard.log
$PY speed_memory.py toy2d-paper | tee out/toy2d-paper.log
$PY speed_memory.py mnist-1block | tee out/mnist-1block.log
$PY speed_memory.py fig3 | tee out/fig3.log
$PY speed_memory.py mnist-paper | tee out/mnist-paper.log
$PY mnist_budget.py --budget 600 | tee out/mnist_budget.log
$PY families.py --task digits --budget 120 | tee out/families_digits.log
$PY families.py --task toy --budget 60 | tee out/families_toy.log
$PY families.py --task mnist --budget 180 | tee out/families_mnist.log
$PY flowpp.py --task digits --budget 120 --k 16 | tee out/flowpp_digits.log
$PY flowpp.py --task mnist --budget 120 --k 4 --eval-max 1000 | tee out/flowpp_mnist.log
# the paper's analyses (issue 12)
# (speed_memory.py fig3-cifar10 needs more memory than this machine has: run it on a GPU)
$PY bias.py | tee out/bias.log
$PY activations.py --steps 300 | tee out/activations.log
$PY norms.py --data checkerboard --steps 400 | tee out/norms_checkerboard.log
$PY hybrid.py --steps 300 | tee out/hybrid.log
$PY densities.py --steps 300 --data 8gaussians checkerboard --papers | tee out/densities.log
# issues 31 and 33: the peers (zuko, normflows, nflows: pip install -e ".[peers]"; skipped
# when absent) and the small presets' fingerprints (diff two commits' outputs)
$PY peers.py --budget 20 --repeats 2 | tee out/peers.log
$PY identity.py | tee out/identity.log
$PY host_reads.py | tee out/host_reads.log
