# Sourced by the ci/ scripts and tests: one place for caches, tool paths and runtime folders.
# Everything downloaded or built goes under ~/.cache/ray-vram (kept between runs on one machine);
# everything a run writes goes under the checkout's .work/ (thrown away with the checkout).
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export RAY_VRAM_CACHE=${RAY_VRAM_CACHE:-$HOME/.cache/ray-vram}
export RAY_VRAM_BIN=$RAY_VRAM_CACHE/bin
export RAY_VRAM_WORK=${RAY_VRAM_WORK:-$ROOT/.work}
export PATH=$RAY_VRAM_BIN:$PATH
# This checkout's package first: the cached venv (shared by every checkout on the machine) holds an
# editable install of whichever checkout installed it last.
case ":${PYTHONPATH:-}:" in *":$ROOT/src:"*) ;; *) export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH} ;; esac
# Temporary files (Ray sessions, vLLM's IPC sockets) go to a short per-checkout folder in /tmp:
# AF_UNIX socket paths are capped at 107 bytes, and Ray's ".../ray/session_<date>_<pid>/sockets/
# plasma_store" under a deep checkout's .work/tmp goes past that.
RAY_VRAM_TMP=${TMPDIR_OVERRIDE:-/tmp/rv-$(printf %s "$RAY_VRAM_WORK" | sha1sum | cut -c1-8)}
mkdir -p "$RAY_VRAM_BIN" "$RAY_VRAM_WORK" "$RAY_VRAM_TMP"
# vLLM / Ray on a CPU machine without a model hub (see docs/install.md "Local mode").
export TMPDIR=$RAY_VRAM_TMP
export RAY_TMPDIR=$RAY_VRAM_TMP
export XDG_CACHE_HOME=$RAY_VRAM_CACHE/xdg
export VLLM_CACHE_ROOT=$RAY_VRAM_CACHE/vllm
export TORCHINDUCTOR_CACHE_DIR=$RAY_VRAM_CACHE/inductor
export HF_HOME=$RAY_VRAM_CACHE/hf
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# Tests only: their Ray clusters skip token auth (faster, no token to pass around). Nothing that
# ships defaults to this: ci/up.sh drops it, and local mode turns auth on unless told otherwise.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_USAGE_STATS_ENABLED=0
export PIP_DISABLE_PIP_VERSION_CHECK=1
