# shellcheck shell=bash
# Shared by every slurm/*.sbatch script: defaults, process counts, the launcher and preemption.
#
# The sbatch scripts set AKI_ROOT (the repository) and source this file. It provides
#   aki_launch MODULE ARGS...   run `python -m MODULE ARGS` on every GPU of every node of the job:
#                               srun starts one torchrun per node, the ranks meet by c10d rendezvous
#                               on the job's first node; outside SLURM one local torchrun.
#   aki_finish RC               after a launch: requeue the job when it was told to stop (USR1) or
#                               a rank ended on a transient failure (storage unreachable past its retry
#                               window, a stalled step: the line in AKI_REQUEUE_FILE), at most
#                               AKI_MAX_REQUEUES times; otherwise exit with the launch's status.
# Preemption: `#SBATCH --signal=B:USR1@N` makes SLURM signal this batch shell N seconds before the
# time limit. The trap forwards USR1 to the ranks (torchrun itself ignores it), the trainer saves a
# checkpoint at the next step boundary and exits 0, and aki_finish requeues the job; the requeued job
# (same job id) resumes because training is always started with `--resume auto`.
# Every variable is documented in slurm/README.md.

aki_log() { printf '[aki %s] %s\n' "$(date '+%F %T')" "$*" >&2; }
aki_die() {
  aki_log "error: $*"
  exit 2
}
aki_in_slurm() { [[ -n "${SLURM_JOB_ID:-}" ]]; }

# --- Python and the repository ------------------------------------------------------------------
: "${AKI_PYTHON:=python}"
command -v "$AKI_PYTHON" >/dev/null 2>&1 ||
  aki_die "AKI_PYTHON='$AKI_PYTHON' is not an executable; set AKI_PYTHON=/path/to/.venv/bin/python"
export PYTHONPATH="$AKI_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# shellcheck source=slurm/cluster.sh
source "$AKI_ROOT/slurm/cluster.sh"

# --- processes per node ---------------------------------------------------------------------------
aki_count_gpus() {
  if aki_in_slurm; then # only what SLURM allocated, never what the node happens to have
    echo "${SLURM_GPUS_ON_NODE:-0}"
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local list="${CUDA_VISIBLE_DEVICES//[^,0-9a-zA-Z-]/}"
    if [[ -z "$list" ]]; then echo 0; else awk -F, '{print NF}' <<<"$list"; fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
: "${GPUS_PER_NODE:=$(aki_count_gpus)}"
: "${CPU_PROCS_PER_NODE:=1}"
if ((GPUS_PER_NODE > 0)); then
  NPROC_PER_NODE="$GPUS_PER_NODE"
else
  NPROC_PER_NODE="$CPU_PROCS_PER_NODE"
  export DS_ACCELERATOR=cpu # DeepSpeed's CPU accelerator; the trainer then uses the gloo backend
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then # the node's CPUs shared among its ranks
  _aki_cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
  export OMP_NUM_THREADS=$((_aki_cpus / NPROC_PER_NODE > 0 ? _aki_cpus / NPROC_PER_NODE : 1))
  unset _aki_cpus
fi
NNODES="${SLURM_JOB_NUM_NODES:-1}"
if aki_in_slurm; then
  : "${RDZV_HOST:=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
  : "${RDZV_PORT:=$((29500 + SLURM_JOB_ID % 10000))}"
fi

# --- requeue after a transient failure ----------------------------------------------------------------
: "${AKI_MAX_REQUEUES:=3}" # requeues after transient failures (SLURM_RESTART_COUNT counts every requeue)

# aki_requeue_transient RC: a rank wrote a transient failure into AKI_REQUEUE_FILE; requeue the job if
# the budget allows (returns when it does not; the caller then exits with RC).
aki_requeue_transient() {
  local restarts="${SLURM_RESTART_COUNT:-0}"
  aki_log "the ranks stopped on a transient failure (exit status $1): $(head -n 1 "$AKI_REQUEUE_FILE")"
  if ! aki_in_slurm; then
    aki_log "run the same command again to resume from the last checkpoint"
  elif ((restarts >= AKI_MAX_REQUEUES)); then
    aki_log "not requeueing: job $SLURM_JOB_ID was requeued $restarts time(s) already (AKI_MAX_REQUEUES=$AKI_MAX_REQUEUES)"
  else
    aki_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)), at most $AKI_MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" || aki_die "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
    sleep 60 # SLURM ends this script as part of the requeue
  fi
}

# --- stop signals -----------------------------------------------------------------------------------
AKI_STOP_SIGNAL=""  # the signal that asked this job to stop (USR1: preemption warning), if any
AKI_LAUNCH_PID=""   # srun (SLURM) or torchrun (local) of the running launch

# USR1 (preemption warning): ask the ranks to save and stop; aki_finish requeues the job afterwards.
# TERM (scancel, time limit, preemption by SLURM): under SLURM every process of the job already got it,
# so only keep waiting for the ranks to finish saving; outside SLURM pass it on like USR1.
# INT (Ctrl-C outside SLURM): the first one stops gracefully, a second one terminates torchrun.
aki_on_signal() {
  local sig="$1"
  if [[ "$sig" == INT && "$AKI_STOP_SIGNAL" == INT ]]; then
    aki_log "second SIGINT: terminating the launch"
    kill -TERM "$AKI_LAUNCH_PID" 2>/dev/null || true
    return
  fi
  [[ "$AKI_STOP_SIGNAL" == USR1 ]] || AKI_STOP_SIGNAL="$sig"
  [[ -n "$AKI_LAUNCH_PID" ]] || return 0
  if aki_in_slurm; then
    if [[ "$sig" == USR1 ]]; then
      aki_log "SIGUSR1: asking every rank to save a checkpoint and stop; the job requeues afterwards"
      kill -USR1 "$AKI_LAUNCH_PID" 2>/dev/null || true # srun passes it to all processes of the step
    else
      aki_log "SIG$sig: waiting for the ranks to save and exit"
    fi
  else
    aki_log "SIG$sig: asking every rank to save a checkpoint and stop"
    pkill -USR1 -P "$AKI_LAUNCH_PID" 2>/dev/null || true # the ranks are torchrun's children
  fi
}
trap 'aki_on_signal USR1' USR1
trap 'aki_on_signal TERM' TERM
aki_in_slurm || trap 'aki_on_signal INT' INT

# --- the launcher ----------------------------------------------------------------------------------
# aki_launch MODULE ARGS...: start the ranks, wait for them (through any signals), return their status.
# Console lines are prefixed with the global rank (and, under srun, the node index); each rank's full
# output is also kept in ${RANK_LOG_DIR}/node<N>/... when RANK_LOG_DIR is set.
aki_launch() {
  local module="$1"
  shift
  # shellcheck disable=SC2016 # ${rank} is a torchrun template macro, not a shell variable
  local prefix='[rank${rank}]: '
  local -a torchrun=("$AKI_PYTHON" -m torch.distributed.run --nproc-per-node="$NPROC_PER_NODE"
    --tee=3 --log-line-prefix-template="$prefix")
  local -a launcher=()
  if aki_in_slurm; then
    torchrun+=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"
      --rdzv-id="$SLURM_JOB_ID")
    launcher=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then launcher+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  else
    torchrun+=(--standalone)
  fi
  aki_log "launch: $NNODES node(s) x $NPROC_PER_NODE process(es) (GPUs per node: $GPUS_PER_NODE)," \
    "rendezvous ${RDZV_HOST:-local}${RDZV_PORT:+:$RDZV_PORT}: python -m $module $*"
  # On each node: torchrun ignores USR1 (inherited SIG_IGN; the trainer installs its own handler), so
  # the signal that srun delivers to every process of the step only makes the ranks save and stop.
  # shellcheck disable=SC2016 # expanded by the per-node shell, where SLURM_NODEID is that node's
  "${launcher[@]}" bash -c 'trap "" USR1
    if [[ -n "$0" ]]; then export PET_LOG_DIR="$0/node${SLURM_NODEID:-0}"; fi
    exec "$@"' "${RANK_LOG_DIR:-}" "${torchrun[@]}" -m "$module" "$@" &
  AKI_LAUNCH_PID=$!
  # `wait` returns early whenever a trapped signal arrives; keep waiting until the launch has exited.
  while kill -0 "$AKI_LAUNCH_PID" 2>/dev/null; do wait "$AKI_LAUNCH_PID" || true; done
  local rc=0
  wait "$AKI_LAUNCH_PID" || rc=$?
  AKI_LAUNCH_PID=""
  return "$rc"
}

# aki_finish RC: end the batch script after a launch that returned RC.
aki_finish() {
  local rc="$1"
  if [[ "$AKI_STOP_SIGNAL" != USR1 ]]; then
    if [[ -n "$AKI_STOP_SIGNAL" ]]; then aki_log "stopped on SIG$AKI_STOP_SIGNAL (exit status $rc)"; fi
    if ((rc != 0)) && [[ -z "$AKI_STOP_SIGNAL" && -s "${AKI_REQUEUE_FILE:-}" ]]; then aki_requeue_transient "$rc"; fi
    exit "$rc"
  fi
  if ((rc != 0)); then
    aki_log "stopped on SIGUSR1 but the ranks exited with status $rc; not requeueing"
    exit "$rc"
  fi
  if aki_in_slurm; then
    aki_log "checkpoint saved after SIGUSR1; requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    scontrol requeue "$SLURM_JOB_ID" || aki_die "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
    sleep 60 # SLURM ends this script as part of the requeue
  else
    aki_log "checkpoint saved after SIGUSR1; run the same command again to resume"
  fi
  exit 0
}

# --- the training stages -----------------------------------------------------------------------------
# aki_train ARGS...: pipeline.train with RECIPE, OUTPUT_DIR, DS_CONFIG, INIT_FROM and TRAIN_ARGS, then
# aki_finish. `--resume auto` is always passed, so a requeued or resubmitted job continues where the
# last complete checkpoint in OUTPUT_DIR left off. ARGS (the sbatch script's arguments) go last.
aki_train() {
  [[ -n "${RECIPE:-}" ]] || aki_die "RECIPE is not set; give a recipe name or YAML path (pipeline/configs/)"
  local recipe_name="${RECIPE##*/}"
  : "${OUTPUT_DIR:=runs/${recipe_name%.yaml}}"
  : "${RANK_LOG_DIR:=$OUTPUT_DIR/logs/job-${SLURM_JOB_ID:-local}}"
  local -a args=(--config "$RECIPE" --output-dir "$OUTPUT_DIR" --resume auto)
  if [[ -n "${DS_CONFIG:-}" ]]; then args+=(--set "train.deepspeed=$DS_CONFIG"); fi
  if [[ -n "${INIT_FROM:-}" ]]; then args+=(--set "train.init_from=$INIT_FROM"); fi
  local -a extra=()
  read -r -a extra <<<"${TRAIN_ARGS:-}"
  aki_log "recipe $RECIPE -> $OUTPUT_DIR (DeepSpeed: ${DS_CONFIG:-as in the recipe}; restart ${SLURM_RESTART_COUNT:-0})"
  export AKI_REQUEUE_FILE="$RANK_LOG_DIR/requeue" # on the shared file system: every node's ranks write here
  mkdir -p "$RANK_LOG_DIR" && rm -f "$AKI_REQUEUE_FILE"
  local rc=0
  aki_launch pipeline.train "${args[@]}" "${extra[@]}" "$@" || rc=$?
  aki_finish "$rc"
}
