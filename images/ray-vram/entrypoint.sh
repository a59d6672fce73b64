#!/bin/sh
# Entrypoint of the ray-vram image: one image for Ray heads, Ray workers and the serving controller.
#   head|worker [ray start args]  -> ray-vram node-start: Ray with this node's GPUs and VRAM declared
#   serve|plan|... [args]         -> that ray-vram command
#   anything else                 -> run as given (bash, python, ray, ...)
set -e
case "${1:-}" in
  head | worker) exec ray-vram node-start "$@" ;;
  "") exec ray-vram --help ;;
  -*) exec ray-vram "$@" ;;
esac
# A ray-vram sub-command (listed by --help as "    NAME  help" or "    NAME" alone) wins over a
# program of the same name (Ray installs its own `serve`).
if ray-vram --help 2>/dev/null | grep -qE "^    $1( |\$)"; then
  exec ray-vram "$@"
fi
exec "$@"
