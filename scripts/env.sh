# Sourced by ferrotune's scripts: where the Python environment lives and how cargo finds libtorch.
# FERROTUNE_HOME (default ~/.cache/ferrotune) holds venv/ (torch 2.13 + reference packages) and fixtures/.
export FERROTUNE_HOME="${FERROTUNE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrotune}"
export FERROTUNE_VENV="$FERROTUNE_HOME/venv"
# torch-sys asks the active Python for libtorch (LIBTORCH_USE_PYTORCH=1); VIRTUAL_ENV makes it call `python`.
export VIRTUAL_ENV="$FERROTUNE_VENV"
export PATH="$FERROTUNE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# The binary carries libtorch's directory as its run path; nothing needs LD_LIBRARY_PATH. A ferrotune
# built for another host (FERROTUNE_BIN, set by .device/run) finds that host's libtorch through it.
[ -n "${FERROTUNE_BIN:-}" ] || unset LD_LIBRARY_PATH
