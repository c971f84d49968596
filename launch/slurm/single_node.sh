#!/usr/bin/env bash
# Train on one node, all of its allocated GPUs (or its CPUs when it has none).
#
#   sbatch --gpus-per-node=4 --cpus-per-task=32 --time=24:00:00 \
#       launch/slurm/single_node.sh --config launch/configs/cifar10_lt_g100.yaml [key=value ...]
#
# Submit from the repo root with the project's env active (or set BMB_ROOT / BMB_ENV); every
# knob is an sbatch flag or a BMB_* variable (see launch/slurm/common.sh), e.g.
# `BMB_MIXED_PRECISION=bf16 sbatch ...`. Log: <job-name>-<job-id>.out in the submit directory,
# appended to across requeues.
#
# Preemption: SLURM sends SIGUSR1 to this shell 300 s before the time limit; the trainer finishes
# its step, writes a checkpoint and exits, and the job requeues itself. The requeued job runs this
# same script, which resumes from that checkpoint (train.resume=auto). A plain `scancel` (SIGTERM)
# also checkpoints, but does not requeue. Preempt by hand: `scancel --signal=USR1 --batch JOBID`.
#
#SBATCH --job-name=bmb
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -uo pipefail

NNODES=1
# sbatch runs a copy of this file from its spool directory: find the repo by the submit dir.
# shellcheck source=launch/slurm/common.sh
source "${BMB_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/launch/slurm/common.sh" || exit 2
bmb_init "$@"
# No srun: the launcher is a child of this shell, so the signal reaches it through the process tree.
bmb_run accelerate launch "${LAUNCH_ARGS[@]}" --machine_rank 0 --main_process_ip 127.0.0.1 \
    launch/train.py "${TRAIN_ARGS[@]}"
bmb_finish
