#!/usr/bin/env bash
# The wheels that scripts/gpu_check.py's optional peer (lightly-train) needs on a GPU machine without a package index,
# whose CUDA image (Python 3.12; torch, Lightning, timm, OpenCV already there) reaches no registry.
# Run here, where PyPI is reachable; the run carries .whl/ and installs it first (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for n in 2_28 2_27 2_24 2_17 2014 1; do
  case $n in 2014|1) platforms+=(--platform "manylinux${n}_x86_64") ;; *) platforms+=(--platform "manylinux_${n}_x86_64") ;; esac
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  lightly-train==0.18.0 lightly==1.6.0 albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2 \
  pycocotools==2.0.11 eval-type-backport==0.4.0 omegaconf==2.3.1 hydra-core==1.3.8 pydantic==2.11.10 \
  pydantic-core==2.33.2 annotated-types==0.8.0 typing-inspection==0.4.2
# omegaconf's parser runtime is published as source only: a pure-Python wheel built here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
