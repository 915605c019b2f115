#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM slice (v4-32, v5p-64, ...): one process per host,
# all started at once with `--worker=all`. Run it from your own machine:
#
#   TPU_NAME=my-slice ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=configs/dit_xl_video.py --workdir=gs://BUCKET/runs/xl
#
# `--dry_run` as the first argument (or DRY_RUN=1) prints the gcloud command and the
# command every worker runs, and runs nothing.
#
# Once per slice, put the code on every host (REPO is where it lands, default ~/vdit_jax):
#
#   gcloud compute tpus tpu-vm ssh my-slice --zone us-central2-b --worker=all --command \
#       "git clone https://YOUR/vdit_jax.git ~/vdit_jax &&
#        cd ~/vdit_jax && pip install -e '.[tpu,video]'"
#
# VDIT_DISTRIBUTED_AUTO=1 makes vdit_jax.main call jax.distributed.initialize() with no
# arguments; JAX finds the hosts through the TPU metadata server: each worker's process id
# is its worker number (agent-worker-number), and worker 0 hosts the coordinator (port
# 8482). --workdir must be a path every host reaches (a gs://BUCKET/... path, or an NFS /
# Filestore / gcsfuse mount): Orbax writes one checkpoint there from all hosts together.
# The host set-up of vdit_jax/runtime.py (allocator, huge pages) runs on every host;
# VDIT_RUNTIME=0 or VDIT_ALLOCATOR=... set here is passed on to the hosts. Stop a run
# with Ctrl-C and then
#   gcloud compute tpus tpu-vm ssh my-slice --zone ZONE --worker=all \
#       --command "pkill -f vdit_jax.main"
set -euo pipefail
dry_run="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
: "${TPU_NAME:?set TPU_NAME to the slice name}" "${ZONE:?set ZONE to the slice zone}"
REPO="${REPO:-~/vdit_jax}"
# ssh does not carry the local environment: pass the host set-up switches when set.
runtime_env=""
for var in VDIT_RUNTIME VDIT_ALLOCATOR; do
  if [[ -n "${!var+x}" ]]; then runtime_env+="${var}=$(printf '%q' "${!var}") "; fi
done
remote="cd ${REPO} && ${runtime_env}VDIT_DISTRIBUTED_AUTO=1 python -m vdit_jax.main"
if (( $# )); then remote+=" $(printf '%q ' "$@")"; remote="${remote% }"; fi
cmd=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all
     --command "${remote}")
if [[ "${dry_run}" == 1 ]]; then
  echo "# dry run: the command, then what every worker runs (its process id is its worker number)"
  printf '%q ' "${cmd[@]}"; echo
  printf '%s\n' "${remote}"
  exit 0
fi
"${cmd[@]}"
