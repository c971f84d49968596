#!/usr/bin/env bash
# Train on several nodes: one `srun` task per node, each running `accelerate launch` for its GPUs,
# with the rendezvous (first host of the allocation, a port derived from the job id) taken from
# SLURM's environment.
#
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 --time=48:00:00 \
#       launch/slurm/multi_node.sh --config launch/configs/imagenet_lt_20.yaml [key=value ...]
#
# Nodes must be alike (the GPU count is read on the first node). Submit from the repo root with
# the project's env active (or set BMB_ROOT / BMB_ENV); the repo and the data must be on a shared
# filesystem. Knobs: sbatch flags and BMB_* variables (launch/slurm/common.sh). Log:
# <job-name>-<job-id>.out in the submit directory, appended to across requeues.
#
# Preemption: SLURM sends SIGUSR1 to this shell 300 s before the time limit; it is passed to the
# job step with `scancel --signal=USR1`, every rank agrees to stop after the same step, rank 0
# writes a checkpoint, and the job requeues itself and resumes from it.
#
#SBATCH --job-name=bmb-mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -uo pipefail

NNODES=${SLURM_NNODES:-1}
# shellcheck source=launch/slurm/common.sh
source "${BMB_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/common.sh" || exit 2
[[ -n ${SLURM_JOB_ID:-} ]] || bmb_die "multi_node.sh runs under sbatch (it needs srun and the job's node list)"
bmb_init "$@"
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
bmb_log "rendezvous at $MAIN_IP:$BMB_PORT"

# The tasks are children of slurmstepd, not of this shell: signal the whole step (only the
# trainers act on it; see common.sh). All ranks then stop at the same step.
bmb_forward_step() { scancel --signal="$1" "$SLURM_JOB_ID" || true; }
BMB_FORWARD=bmb_forward_step

step=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# Since SLURM 22.05 srun does not inherit --cpus-per-task from sbatch: pass it on.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# slurmstepd resets signal dispositions: re-establish "ignore" in each task before accelerate.
# shellcheck disable=SC2016
bmb_run "${step[@]}" bash -c 'trap "" USR1 TERM; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' bmb \
    "${LAUNCH_ARGS[@]}" --main_process_ip "$MAIN_IP" --rdzv_backend static --same_network \
    launch/train.py "${TRAIN_ARGS[@]}"
bmb_finish
