# Source me: environment for building and running cxr-train against the torch wheel
# in .venv (see scripts/setup.sh --train).
_cxr_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LIBTORCH_USE_PYTORCH=1
# torch-sys asks `python` (in a virtualenv) for the torch wheel's paths and ABI.
export VIRTUAL_ENV="$_cxr_root/.venv"
case ":$PATH:" in *":$VIRTUAL_ENV/bin:"*) ;; *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;; esac
_torch_lib="$("$VIRTUAL_ENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
[ -n "$_torch_lib" ] && export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$_cxr_root/.ort/lib/libonnxruntime.so}"
unset _cxr_root _torch_lib
# dicom-rs errors (snafu) capture a backtrace whenever RUST_BACKTRACE is set, which
# makes every refused upload cost milliseconds; panics still print theirs.
export RUST_LIB_BACKTRACE=${RUST_LIB_BACKTRACE:-0}
