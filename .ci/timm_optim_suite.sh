#!/usr/bin/env bash
# timm's own optimizer tests (tests/test_optim.py from the sdist of the installed timm version, unchanged)
# for esam, sam and msam. Fails if any selected case fails. Needs the network (pip) and ~1 minute.
#
# Two passes: over the optimizers' default base (Nesterov SGD) and over AdamW. The common-kwargs case
# runs only over AdamW: it asserts that an optimizer taking `betas` stores them in its param groups,
# which a wrapper over SGD cannot do (the wrapper passes betas on; SGD's timm OptimInfo drops them).
# .ci/timm_suite_backend.py says which registry defaults the suite runs with, and why.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
version="$(python -c 'import timm; print(timm.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pip download "timm==$version" --no-binary :all: --no-deps -d "$work/sdist" -q
tar -xzf "$work/sdist/timm-$version.tar.gz" -C "$work/sdist"
# Only the test file and its conftest: the sdist's own timm/ source must not shadow the installed timm.
mkdir "$work/suite"
cp "$work/sdist/timm-$version/tests/test_optim.py" "$work/sdist/timm-$version/tests/conftest.py" "$work/suite/"
printf '[pytest]\n' > "$work/suite/pytest.ini"
python -c 'import expecttest' 2>/dev/null || pip install -q expecttest  # torch.testing._internal needs it

export PYTHONPATH="$repo/.ci${PYTHONPATH:+:$PYTHONPATH}" TORCH_BACKEND=timm_suite_backend TORCH_DEVICE=cpu
cd "$work/suite"
names='esam or msam or sam'
echo "timm $version tests/test_optim.py for esam, sam, msam over their default base (SGD)"
ESAM_SUITE_BASE='' python -m pytest -q -p no:cacheprovider test_optim.py -k "$names" \
    --deselect 'test_optim.py::test_optim_factory_common_kwargs[esam]' \
    --deselect 'test_optim.py::test_optim_factory_common_kwargs[sam]' \
    --deselect 'test_optim.py::test_optim_factory_common_kwargs[msam]'
echo "timm $version tests/test_optim.py for esam, sam, msam over AdamW"
ESAM_SUITE_BASE=adamw python -m pytest -q -p no:cacheprovider test_optim.py -k "$names"
