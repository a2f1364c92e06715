#!/bin/sh
# Container entrypoint: set up FSL's environment if the host's FSL is mounted, then become
# tbss-queue (exec, so SIGTERM from `docker stop` reaches the worker: no new commands, running
# ones get --grace seconds, then go back to the queue).
set -e
# .env.example's placeholders are no password: refuse them (docker-compose.yml's Redis does too)
case "${TBSS_QUEUE_BROKER:-} ${TBSS_QUEUE_FLOWER_AUTH:-}" in
  *change-me*)
    echo "tbss-queue: a password is still the change-me placeholder: set REDIS_PASSWORD and FLOWER_AUTH in .env" >&2
    exit 2 ;;
esac
if [ -n "${FSLDIR:-}" ] && [ -f "$FSLDIR/etc/fslconf/fsl.sh" ]; then
  . "$FSLDIR/etc/fslconf/fsl.sh"
  PATH="$FSLDIR/bin:$PATH"
  export PATH FSLDIR
fi
: "${FSLOUTPUTTYPE:=NIFTI_GZ}"
export FSLOUTPUTTYPE
exec tbss-queue "$@"
