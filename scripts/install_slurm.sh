#!/usr/bin/env bash
# Installs a local Slurm (Debian's slurmctld, slurmd, slurm-client; Slurm 22.05) and munge for
# the tests, if missing. Idempotent: does nothing when the binaries are already there.
# Needs root and apt (Debian/Ubuntu); exits non-zero (and says why) when it cannot install.
set -euo pipefail
need=()
for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null 2>&1 || need+=("$b"); done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "[install_slurm] missing ${need[*]} and not root: cannot install" >&2; exit 1; fi
if ! command -v apt-get >/dev/null 2>&1; then echo "[install_slurm] missing ${need[*]} and no apt-get" >&2; exit 1; fi
echo "[install_slurm] installing slurmctld slurmd slurm-client munge"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
# Debian's postinst may try to start services; there is no systemd here and the tests start
# their own daemons with their own configuration, so nothing else is needed.
command -v slurmctld >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null
