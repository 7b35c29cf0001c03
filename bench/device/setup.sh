# Sourced on the GPU machine by each script here: installs the wheels of .whl/
# (bench/device/wheels.sh) into /tmp/site once per machine, puts them and the checkout
# on PYTHONPATH, and prints what the machine has.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if [ ! -e /tmp/site/deepspeed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
fi
python3 -c "import torch, deepspeed, pydantic, launcher.trainer; print(torch.__version__, torch.cuda.get_device_name(), deepspeed.__version__, pydantic.__version__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
nproc
