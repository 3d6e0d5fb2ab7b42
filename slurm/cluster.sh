# shellcheck shell=bash
# Site settings of the cluster: the one place for NCCL, network and module settings.
#
# Sourced by slurm/common.sh before every launch (on the first node; srun passes the environment on to
# the other nodes). Every line is a default: a variable already set in the environment, e.g. with
# `VAR=... sbatch ...` or `sbatch --export=ALL,VAR=...`, wins. Empty means "not set": NCCL decides.
# Edit this file once per cluster; slurm/README.md explains each setting.

# Software stack (uncomment what your cluster needs):
# module load cuda/12.4 nccl
# source /path/to/conda/etc/profile.d/conda.sh && conda activate aki

: "${NCCL_DEBUG:=WARN}"                   # INFO prints the transports, NICs and rings NCCL picked
: "${NCCL_SOCKET_IFNAME:=}"               # e.g. ib0, eth0, ^lo,docker: interface(s) for NCCL sockets
: "${GLOO_SOCKET_IFNAME:=}"               # the same for gloo (CPU runs, some barriers)
: "${NCCL_IB_HCA:=}"                      # e.g. mlx5_0,mlx5_1: InfiniBand adapters (empty: all)
: "${NCCL_IB_DISABLE:=}"                  # 1 on clusters without InfiniBand/RoCE (TCP sockets only)
: "${NCCL_NET_GDR_LEVEL:=}"               # GPUDirect RDMA distance, e.g. PHB; leave empty unless tuned
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}" # a failed rank aborts the collectives instead of hanging
: "${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:=}" # seconds before a stuck collective kills the job (torch default)

for _aki_var in NCCL_DEBUG NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE \
  NCCL_NET_GDR_LEVEL TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC; do
  if [[ -n "${!_aki_var}" ]]; then export "${_aki_var?}"; else unset "$_aki_var"; fi
done
unset _aki_var
