# Shared by launch/slurm/single_node.sh and launch/slurm/multi_node.sh (sourced, not submitted).
#
# What it does for them:
#   bmb_init "$@"      cd to the repo, activate $BMB_ENV, build the trainer arguments, check the
#                      config (a typo fails here, before any GPU time), find the run directory,
#                      count GPUs, choose the accelerate launch flags.
#   bmb_run CMD...     run CMD in the background with SIGUSR1/SIGTERM *ignored* in it, trap both
#                      in this shell, forward them with $BMB_FORWARD, wait, set BMB_RC.
#   bmb_finish         exit 0 when training finished; after SIGUSR1 (the time-limit warning from
#                      `#SBATCH --signal=B:USR1@...`) requeue the job, which resumes from the
#                      checkpoint the trainer wrote on the signal.
#
# Why children ignore the signals: the trainer (launch/train.py) installs its own SIGUSR1/SIGTERM
# handler (finish the step, checkpoint, exit 3), which replaces the inherited "ignore". Every other
# process in the tree keeps ignoring them: the `accelerate launch` process (its default action
# would kill it and orphan the trainer), torchrun's agent, and DataLoader workers (whose death
# would crash the trainer mid-step). So a signal can be sent to the whole process tree, or to a
# whole job step with `scancel --signal`, and only the trainers act on it.

bmb_log() { echo "[slurm $(date +%H:%M:%S)] $*"; }
bmb_die() { echo "[slurm] error: $*" >&2; exit 2; }

# bmb_init ARGS...: sets BMB_ROOT, TRAIN_ARGS, RUN_DIR, GPUS_PER_NODE, PROCS_PER_NODE, LAUNCH_ARGS.
# Needs NNODES set by the caller. Environment (all optional):
#   BMB_ROOT             repo checkout (default: the directory sbatch was called from)
#   BMB_ENV              a virtualenv/conda prefix to activate (default: use PATH as submitted)
#   BMB_CONFIG           preset, e.g. launch/configs/cifar10_lt_g100.yaml (or pass --config ...)
#   BMB_OVERRIDES        space-separated key=value overrides (script arguments are appended)
#   BMB_GPUS_PER_NODE    GPUs per node to use (default: what torch sees, i.e. SLURM's allocation)
#   BMB_CPU_PROCS        processes per node when there is no GPU (default 1)
#   BMB_CPU_THREADS      CPU threads per process (default: --cpus-per-task / processes per node)
#   BMB_ACCELERATE_CONFIG an `accelerate config` file (e.g. DeepSpeed); flags below still apply
#   BMB_MIXED_PRECISION  no | fp16 | bf16 (default: no)
#   BMB_PORT             rendezvous port (default: 20000 + job id mod 20000)
#   BMB_LAUNCH_ARGS      extra `accelerate launch` flags, space-separated
bmb_init() {
    BMB_ROOT=${BMB_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$BMB_ROOT" || bmb_die "BMB_ROOT=$BMB_ROOT is not a directory"
    [[ -f launch/train.py ]] || bmb_die "BMB_ROOT=$BMB_ROOT has no launch/train.py: submit from the repo root or set BMB_ROOT"
    if [[ -n ${BMB_ENV:-} ]]; then
        [[ -f $BMB_ENV/bin/activate ]] || bmb_die "BMB_ENV=$BMB_ENV has no bin/activate"
        # shellcheck disable=SC1091
        source "$BMB_ENV/bin/activate"
    fi
    command -v accelerate >/dev/null || bmb_die "accelerate is not on PATH (activate the env before sbatch, or set BMB_ENV)"
    command -v python >/dev/null || bmb_die "python is not on PATH (activate the env before sbatch, or set BMB_ENV)"

    TRAIN_ARGS=()
    [[ -n ${BMB_CONFIG:-} ]] && TRAIN_ARGS+=(--config "$BMB_CONFIG")
    local overrides=()
    read -r -a overrides <<<"${BMB_OVERRIDES:-}"
    TRAIN_ARGS+=("${overrides[@]}" "$@")
    [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || bmb_die "nothing to train: pass --config PRESET [key=value ...] or set BMB_CONFIG"

    # One Python start (torch is slow to import) resolves the config, which names the run directory
    # (a bad key/value stops the job here, before any training), and counts the GPUs torch sees
    # (it honours CUDA_VISIBLE_DEVICES, which SLURM sets to the job's GPUs).
    local probe
    probe=$(python - "${TRAIN_ARGS[@]}" <<'EOF'
import sys

import torch

from bmb.config import ConfigError, load_config
from launch.train import parse_args

args, overrides = parse_args(sys.argv[1:])
try:
    cfg = load_config(args.config, overrides)
except ConfigError as e:
    sys.exit(f"config error: {e}")
print(f"{cfg.train.out_dir}/{cfg.name}")
print(torch.cuda.device_count())
EOF
    ) || bmb_die "bad trainer arguments: ${TRAIN_ARGS[*]}"
    RUN_DIR=$(sed -n 1p <<<"$probe")
    GPUS_PER_NODE=${BMB_GPUS_PER_NODE:-$(sed -n 2p <<<"$probe")}

    LAUNCH_ARGS=()
    [[ -n ${BMB_ACCELERATE_CONFIG:-} ]] && LAUNCH_ARGS+=(--config_file "$BMB_ACCELERATE_CONFIG")
    if ((GPUS_PER_NODE > 0)); then
        PROCS_PER_NODE=$GPUS_PER_NODE
    else
        PROCS_PER_NODE=${BMB_CPU_PROCS:-1}
        export ACCELERATE_USE_CPU=true
    fi
    local total=$((PROCS_PER_NODE * NNODES))
    if ((total > 1)); then
        # torchrun under the hood; on CPUs too (the trainer then picks gloo): accelerate's --cpu
        # runs one process only.
        LAUNCH_ARGS+=(--multi_gpu)
    elif ((GPUS_PER_NODE == 0)); then
        LAUNCH_ARGS+=(--cpu)
    fi
    # CPU threads per process (accelerate sets OMP_NUM_THREADS from it): share the task's CPUs.
    local cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
    local threads=$((cpus / PROCS_PER_NODE > 0 ? cpus / PROCS_PER_NODE : 1))
    LAUNCH_ARGS+=(--num_cpu_threads_per_process "${BMB_CPU_THREADS:-$threads}")
    BMB_PORT=${BMB_PORT:-$((20000 + ${SLURM_JOB_ID:-$$} % 20000))}
    LAUNCH_ARGS+=(--num_machines "$NNODES" --num_processes "$total" --main_process_port "$BMB_PORT"
        --mixed_precision "${BMB_MIXED_PRECISION:-no}" --dynamo_backend no
        --quiet)  # the launcher would add its own traceback to every non-zero trainer exit
    local extra=()
    read -r -a extra <<<"${BMB_LAUNCH_ARGS:-}"
    LAUNCH_ARGS+=("${extra[@]}")

    bmb_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $NNODES node(s) x $PROCS_PER_NODE process(es), $GPUS_PER_NODE GPU(s) per node"
    bmb_log "run directory $RUN_DIR; trainer arguments: ${TRAIN_ARGS[*]}"
}

# Pids of PID and all its descendants (read from /proc: no procps needed).
bmb_tree() {
    local root=$1 stat rest pid ppid
    local -A kids=()
    for stat in /proc/[0-9]*/stat; do
        read -r rest 2>/dev/null <"$stat" || continue  # the process may have exited meanwhile
        pid=${rest%% *}
        rest=${rest##*) }  # the command name may contain spaces and ')': skip past the last ')'
        read -r _ ppid _ <<<"$rest"
        kids[$ppid]+=" $pid"
    done
    local queue=("$root") out=()
    while ((${#queue[@]})); do
        pid=${queue[0]}
        queue=("${queue[@]:1}")
        out+=("$pid")
        # shellcheck disable=SC2206
        [[ -n ${kids[$pid]:-} ]] && queue+=(${kids[$pid]})
    done
    echo "${out[@]}"
}

# Default forwarder (one node): the signal goes to every process under the launcher.
bmb_forward_tree() {
    local sig=$1
    # shellcheck disable=SC2046
    kill -s "$sig" $(bmb_tree "$BMB_CHILD") 2>/dev/null || true
}

_bmb_on_signal() {
    local sig=$1
    BMB_NSIG=$((BMB_NSIG + 1))
    BMB_LAST_SIG=$sig
    [[ $sig == USR1 ]] && BMB_PREEMPTED=1
    bmb_log "got SIG$sig: forwarding it to the trainer, which finishes its step, writes a checkpoint and exits"
    "$BMB_FORWARD" "$sig"
}

# bmb_run CMD...: runs CMD, forwarding SIGUSR1/SIGTERM through $BMB_FORWARD; sets BMB_RC.
bmb_run() {
    BMB_FORWARD=${BMB_FORWARD:-bmb_forward_tree}
    BMB_NSIG=0
    BMB_LAST_SIG=""
    BMB_PREEMPTED=""
    trap '' USR1 TERM  # inherited by CMD (see the top of this file)
    "$@" &
    BMB_CHILD=$!
    trap '_bmb_on_signal USR1' USR1
    trap '_bmb_on_signal TERM' TERM
    local seen
    while :; do
        seen=$BMB_NSIG
        wait "$BMB_CHILD"
        BMB_RC=$?
        # A trapped signal makes `wait` return early with 128+n: wait again for the real status.
        ((BMB_RC > 128 && BMB_NSIG != seen)) && continue
        break
    done
    trap - USR1 TERM
}

bmb_finish() {
    if ((BMB_RC == 0)); then
        bmb_log "training finished: $RUN_DIR/final.json"
        exit 0
    fi
    if [[ -n $BMB_PREEMPTED && -n ${SLURM_JOB_ID:-} ]]; then
        # The launcher's exit status is not the trainer's (accelerate turns 3 into 1), so the
        # signal this shell received decides.
        bmb_log "stopped by the time-limit signal (launcher exit $BMB_RC): requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            bmb_log "requeued job $SLURM_JOB_ID; the next run resumes from the newest checkpoint in $RUN_DIR/checkpoints"
            exit 0
        fi
        bmb_log "scontrol requeue failed (submitted with --no-requeue?): resubmit the same command to resume"
        exit 3
    fi
    if ((BMB_NSIG > 0)); then  # scancel (SIGTERM), or SIGUSR1 outside SLURM: no requeue
        bmb_log "stopped by SIG$BMB_LAST_SIG (launcher exit $BMB_RC): run the same command again to resume from $RUN_DIR/checkpoints"
        exit 3
    fi
    bmb_log "training failed (launcher exit $BMB_RC)"
    exit "$BMB_RC"
}
