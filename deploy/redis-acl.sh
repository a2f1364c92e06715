#!/bin/sh
# Redis's entrypoint in docker-compose.yml: write its ACL file from deploy/users.acl with each
# role's password hashed (SHA-256) from a secret file, then exec the real entrypoint.
# Passwords travel by file only: never on a command line (`ps`, `docker inspect` show those).
#   TBSS_ACL_TEMPLATE  users.acl (default /usr/local/etc/redis/users.acl)
#   TBSS_ACL_SECRETS   folder of redis-submit, redis-work, redis-watch (default /run/secrets)
#   TBSS_ACL_OUT       the ACL file Redis loads (--aclfile; default /tmp/tbss-users.acl)
set -eu
template=${TBSS_ACL_TEMPLATE:-/usr/local/etc/redis/users.acl}
secrets=${TBSS_ACL_SECRETS:-/run/secrets}
out=${TBSS_ACL_OUT:-/tmp/tbss-users.acl}
script=""
for role in submit work watch; do
  file="$secrets/redis-$role"
  if [ ! -s "$file" ]; then
    echo "redis: no password for tbss-$role: put one in $file (openssl rand -hex 24)" >&2
    exit 1
  fi
  password=$(head -n 1 "$file" | tr -d '\r\n')
  case "$password" in
    *change-me*)
      echo "redis: $file is the change-me placeholder: set a long random password" >&2
      exit 1 ;;
  esac
  case "$password" in
    *[!A-Za-z0-9._~-]*)
      echo "redis: the password in $file has characters a redis:// URL must escape: use openssl rand -hex 24" >&2
      exit 1 ;;
  esac
  if [ "${#password}" -lt 16 ]; then
    echo "redis: the password in $file is shorter than 16 characters" >&2
    exit 1
  fi
  hash=$(printf %s "$password" | sha256sum | cut -d ' ' -f 1)
  upper=$(echo "$role" | tr a-z A-Z)
  script="$script -e s/@$upper@/$hash/"
done
umask 077
grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$template" | sed $script > "$out.tmp"
mv "$out.tmp" "$out"
# the redis image's entrypoint drops to the redis user: it must read the file
chown redis "$out" 2>/dev/null || true
exec "$@"
