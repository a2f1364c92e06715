#!/bin/sh
# Container entrypoint: set up FSL's environment if the host's FSL is mounted, then become
# tbss-queue (exec, so SIGTERM from `docker stop` reaches the worker: no new commands, running
# ones get --grace seconds, then go back to the queue).
set -e
# the Redis password from its file (a Docker secret), never from argv or `docker inspect`:
# compose gives the user, the file and the host; the URL lives only in this process's env
if [ -n "${TBSS_QUEUE_BROKER_PASSWORD_FILE:-}" ]; then
  if [ ! -s "$TBSS_QUEUE_BROKER_PASSWORD_FILE" ]; then
    echo "tbss-queue: no Redis password in $TBSS_QUEUE_BROKER_PASSWORD_FILE (see secrets/ in docker-compose.yml)" >&2
    exit 2
  fi
  password=$(head -n 1 "$TBSS_QUEUE_BROKER_PASSWORD_FILE" | tr -d '\r\n')
  TBSS_QUEUE_BROKER="redis://${TBSS_QUEUE_BROKER_USER:?set TBSS_QUEUE_BROKER_USER}:${password}@${TBSS_QUEUE_BROKER_HOST:-redis:6379/0}"
  export TBSS_QUEUE_BROKER
  unset password
fi
# .env.example's placeholders are no password: refuse them (docker-compose.yml's Redis does too)
case "${TBSS_QUEUE_BROKER:-} ${TBSS_QUEUE_FLOWER_AUTH:-}" in
  *change-me*)
    echo "tbss-queue: a password is still the change-me placeholder: set the secrets/redis-* files and FLOWER_AUTH in .env" >&2
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
