#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ are running on this machine for development and
# tests: uses them if they are up, starts them if installed, installs them with apt if not
# (Debian/Ubuntu). Then creates the `relance` database. Safe to run again and again.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }

apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "error: $* not installed and no apt-get here; install it with your package manager" >&2
    exit 1
  fi
  say "installing $* with apt"
  if [ -z "${APT_UPDATED:-}" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # wait_for NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq 1 "$((seconds * 4))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  echo "error: $name did not come up within ${seconds}s" >&2
  exit 1
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# --- PostgreSQL ---------------------------------------------------------------
pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT"; }
if ! command -v pg_isready >/dev/null || ! pg_up; then
  if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql postgresql-client; fi
  say "starting PostgreSQL"
  for version in $(ls /etc/postgresql 2>/dev/null); do
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
      || $SUDO pg_ctlcluster "$version" main start 2>/dev/null || true
  done
  wait_for PostgreSQL 60 pg_up
fi
if ! psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
  # A fresh Debian install asks for a password over TCP: trust local TCP connections, for
  # development only.
  say "allowing local trust authentication for PostgreSQL (development machine)"
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    if ! $SUDO grep -q '# relance-dev' "$hba"; then
      $SUDO sed -i '1i host all all 127.0.0.1/32 trust # relance-dev\nhost all all ::1/128 trust # relance-dev' "$hba"
    fi
  done
  for version in $(ls /etc/postgresql); do $SUDO pg_ctlcluster "$version" main reload 2>/dev/null || true; done
  wait_for "PostgreSQL (trust auth)" 20 psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -Atqc 'select 1'
fi
if [ "$(psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -Atqc "select 1 from pg_database where datname = 'relance'")" != 1 ]; then
  say "creating database relance"
  psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -qc 'create database relance' >/dev/null
fi

# --- Redis --------------------------------------------------------------------
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG; }
if ! command -v redis-cli >/dev/null || ! redis_up; then
  if ! command -v redis-server >/dev/null; then apt_install redis-server; fi
  say "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/relance-dev.log
  wait_for Redis 20 redis_up
fi

# --- RabbitMQ -----------------------------------------------------------------
rabbit_up() { port_open 127.0.0.1 5672; }
if ! rabbit_up; then
  if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then apt_install rabbitmq-server; fi
  say "starting RabbitMQ (this takes a few seconds)"
  $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for RabbitMQ 120 rabbit_up
  # The AMQP port opens before the broker accepts connections; give it its boot.
  $SUDO rabbitmqctl await_startup >/dev/null 2>&1 || sleep 5
fi

# --- aiosmtpd (the SMTP server the delivery tests send e-mail to) ----------------
if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  say "installing aiosmtpd with pip"
  # Debian's own python3 refuses system-wide pip installs unless told.
  python3 -m pip install --quiet aiosmtpd 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages aiosmtpd
fi

say "PostgreSQL, Redis and RabbitMQ are up; aiosmtpd is installed"
