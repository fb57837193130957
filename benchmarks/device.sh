#!/usr/bin/env bash
# W1 and W7 on the accelerator this machine has (a GPU or TPU; without one, on the CPU, and it says so): restore
# time, warm-start time, their ratio, peak device memory and the device gather's bandwidth. See device.py.
#
#   bash benchmarks/device.sh            # about 3 minutes on a GPU machine (checkpoints built once)
#   bash benchmarks/device.sh --small    # every size 16x smaller: checks the script in a minute
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"  # the library of this checkout
exec timeout "${FWS_DEVICE_TIMEOUT:-290}" "${PYTHON:-python}" "$here/device.py" "$@"
