#!/bin/sh
# Container entrypoint: set up FSL's environment if the host's FSL is mounted, then become
# tbss-queue (exec, so SIGTERM from `docker stop` reaches the worker: no new commands, running
# ones get --grace seconds, then go back to the queue).
set -e
if [ -n "${FSLDIR:-}" ] && [ -f "$FSLDIR/etc/fslconf/fsl.sh" ]; then
  . "$FSLDIR/etc/fslconf/fsl.sh"
  PATH="$FSLDIR/bin:$PATH"
  export PATH FSLDIR
fi
: "${FSLOUTPUTTYPE:=NIFTI_GZ}"
export FSLOUTPUTTYPE
exec tbss-queue "$@"
