#!/usr/bin/env bash
# Train on TPU slices in a GKE cluster: renders launch/gke_jobset.yaml (a JobSet: one
# child Job per slice, one pod per TPU VM host, as XPK runs MaxText) and applies it with
# `kubectl apply -f -`. Run it from your own machine, with kubectl pointed at the cluster:
#
#   IMAGE=us-docker.pkg.dev/PROJECT/REPO/vdit:TAG ACCELERATOR=tpu-v5p-slice \
#   TOPOLOGY=4x4x4 HOSTS_PER_SLICE=16 SLICES=2 JOB_NAME=xl-run1 \
#       launch/gke_jobset.sh --config=configs/dit_xl_video.py --workdir=gs://BUCKET/runs/xl
#
# `--dry_run` as the first argument (or DRY_RUN=1) prints the manifest and applies nothing
# (`launch/gke_jobset.sh --dry_run ... > job.yaml`). Every other argument goes to
# `python -m vdit_jax.main` on every host, unchanged.
#
# Needs: the JobSet controller in the cluster (https://jobset.sigs.k8s.io), one TPU node
# pool per slice with the given accelerator and topology (a multi-host pool is one slice),
# and an image with the repository at CODE_DIR, installed with `pip install -e
# '.[tpu,video]'`. --workdir must be a path every host reaches, a gs://BUCKET/... path;
# the pods' Kubernetes service account must be allowed to write there.
#
# Settings (environment):
#   IMAGE             container image (required)
#   ACCELERATOR       node label cloud.google.com/gke-tpu-accelerator: tpu-v5p-slice,
#                     tpu-v5-lite-podslice, tpu-v6e-slice, ... (required)
#   TOPOLOGY          node label cloud.google.com/gke-tpu-topology, in chips: 2x2x2, 4x4,
#                     ... (required)
#   HOSTS_PER_SLICE   TPU VM hosts (pods) per slice (required)
#   CHIPS_PER_HOST    TPU chips per host, the pod's google.com/tpu limit (default 4);
#                     HOSTS_PER_SLICE x CHIPS_PER_HOST must equal the topology's chips
#   SLICES            number of slices (default 1); more than one joins them over DCN
#                     (Multislice), which GKE supports for multi-host slices only
#   JOB_NAME          JobSet name, a DNS label of at most 40 characters (default vdit);
#                     host i of slice j is JOB_NAME-slice-j-i.JOB_NAME
#   CODE_DIR          where the image holds the repository (default /vdit_jax)
#   PYTHON            the image's Python (default python)
#   MAX_RESTARTS      times the whole JobSet is restarted after a failure (default 3)
#   GRACE_PERIOD_S    seconds from SIGTERM to SIGKILL, to save a checkpoint (default 300)
#   SERVICE_ACCOUNT   Kubernetes service account of the pods (default default)
#
# Watch it with `kubectl get jobset JOB_NAME` and `kubectl logs -f JOB_NAME-slice-0-0-XXXXX`
# (process 0); stop it with `kubectl delete jobset JOB_NAME`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="${here}/gke_jobset.yaml"

dry_run="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi

die() { echo "gke_jobset.sh: $*" >&2; exit 2; }

: "${IMAGE:?set IMAGE to the container image}"
: "${ACCELERATOR:?set ACCELERATOR (e.g. tpu-v5p-slice)}"
: "${TOPOLOGY:?set TOPOLOGY (e.g. 2x2x2)}"
: "${HOSTS_PER_SLICE:?set HOSTS_PER_SLICE (TPU VM hosts per slice)}"
CHIPS_PER_HOST="${CHIPS_PER_HOST:-4}"
SLICES="${SLICES:-1}"
JOB_NAME="${JOB_NAME:-vdit}"
CODE_DIR="${CODE_DIR:-/vdit_jax}"
PYTHON="${PYTHON:-python}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
GRACE_PERIOD_S="${GRACE_PERIOD_S:-300}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-default}"

for var in HOSTS_PER_SLICE CHIPS_PER_HOST SLICES; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "${var}=${!var} must be an integer >= 1."
done
for var in MAX_RESTARTS GRACE_PERIOD_S; do
  [[ "${!var}" =~ ^[0-9]+$ ]] || die "${var}=${!var} must be an integer >= 0."
done
[[ "${JOB_NAME}" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || die "JOB_NAME=${JOB_NAME} must be \
lowercase letters, digits and '-', start with a letter, end with a letter or digit, and \
have at most 40 characters (it becomes part of every host's DNS name)."
[[ "${TOPOLOGY}" =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]] || die "TOPOLOGY=${TOPOLOGY} must \
be 2 or 3 chip counts joined by 'x' (4x4, 2x2x2)."
chips=1
IFS=x read -r -a dims <<< "${TOPOLOGY}"
for d in "${dims[@]}"; do chips=$(( chips * d )); done
(( HOSTS_PER_SLICE * CHIPS_PER_HOST == chips )) || die "TOPOLOGY=${TOPOLOGY} has ${chips} \
chips, but HOSTS_PER_SLICE=${HOSTS_PER_SLICE} x CHIPS_PER_HOST=${CHIPS_PER_HOST} = \
$(( HOSTS_PER_SLICE * CHIPS_PER_HOST )); they must be equal."
(( SLICES == 1 || HOSTS_PER_SLICE > 1 )) || die "SLICES=${SLICES} with HOSTS_PER_SLICE=1: \
GKE joins multi-host slices only (Multislice); use one slice, or a multi-host topology."
for a in "$@"; do
  case "$a" in
    --coordinator_address|--coordinator_address=*|--num_processes|--num_processes=*|\
--process_id|--process_id=*)
      die "${a%%=*} is set up by the JobSet (JAX reads the pod's environment); remove it." ;;
  esac
done

# One process per host: more than one in all needs jax.distributed.
DISTRIBUTED_AUTO=0
if (( SLICES * HOSTS_PER_SLICE > 1 )); then DISTRIBUTED_AUTO=1; fi

# The vdit_jax.main arguments as a YAML flow list of double-quoted strings. Kubernetes
# expands $(NAME) in args and turns $$ into $, so every $ is doubled to arrive unchanged.
MAIN_ARGS="["
sep=""
for a in "$@"; do
  case "$a" in *[[:cntrl:]]*) die "an argument has a control character (a newline?): $a" ;; esac
  a="${a//\\/\\\\}"; a="${a//\"/\\\"}"; a="${a//\$/\$\$}"
  MAIN_ARGS+="${sep}\"${a}\""
  sep=", "
done
MAIN_ARGS+="]"

placeholders=" JOB_NAME IMAGE ACCELERATOR TOPOLOGY SLICES HOSTS_PER_SLICE CHIPS_PER_HOST \
CODE_DIR PYTHON MAX_RESTARTS GRACE_PERIOD_S SERVICE_ACCOUNT DISTRIBUTED_AUTO MAIN_ARGS "
for var in IMAGE ACCELERATOR CODE_DIR PYTHON SERVICE_ACCOUNT; do
  case "${!var}" in *[[:space:][:cntrl:]\"\\]*|"") die "${var}=${!var} must be non-empty, \
without spaces, double quotes or backslashes." ;; esac
done

# Fill in ${NAME} placeholders (NAME from the list above) line by line, without pattern
# substitution, so that no character of a value is special; drop the multi-slice block
# for one slice.
render() {
  local line out name rest skip=0
  while IFS= read -r line || [[ -n "${line}" ]]; do
    if [[ "${line}" == *"# >>> multi-slice"* ]]; then skip=$(( SLICES == 1 )); continue; fi
    if [[ "${line}" == *"# <<< multi-slice"* ]]; then skip=0; continue; fi
    (( skip )) && continue
    out=""
    while [[ "${line}" == *'${'* ]]; do
      out+="${line%%'${'*}"
      rest="${line#*'${'}"
      name="${rest%%'}'*}"
      [[ "${placeholders}" == *" ${name} "* ]] ||
        die "unknown placeholder \${${name}} in ${template}"
      out+="${!name}"
      line="${rest#*'}'}"
    done
    printf '%s\n' "${out}${line}"
  done < "${template}"
}

manifest="$(render)"
if [[ "${dry_run}" == 1 ]]; then
  printf '%s\n' "${manifest}"
else
  printf '%s\n' "${manifest}" | kubectl apply -f -
fi
