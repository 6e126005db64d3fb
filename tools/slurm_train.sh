#!/bin/bash
# Train Strip-MLP on a SLURM cluster, in either of two styles (pick one with LAUNCH below):
#
#   LAUNCH=torchrun  srun starts one torchrun per node, torchrun starts one process per GPU (c10d rendezvous on
#                    the first node, port MASTER_PORT or 29500)
#   LAUNCH=srun      srun starts one task per GPU itself; main.py reads SLURM_PROCID, SLURM_NTASKS and
#                    SLURM_LOCALID and meets the others on the job's first node
#
# Submit:  sbatch tools/slurm_train.sh configs/imagenet1k/strip_mlp_tiny.yaml --data-path /data/imagenet
#
# Preemption and time limits: --signal=USR1@180 asks SLURM to send SIGUSR1 three minutes before the end; every
# rank then finishes its update, rank 0 writes output/.../latest.pth with the position inside the epoch, the
# job is requeued (--requeue) and exits with status 75. The requeued job runs this same script, and main.py
# resumes from the checkpoint it wrote last (TRAIN.AUTO_RESUME); when the options name --resume FILE, it
# continues from the checkpoints it wrote after FILE, not from FILE again, and its log says so. The requeued
# job takes over the output folder's lock that the earlier run of the same job left. TRAIN.SAVE_STEPS N also
# saves every N updates, so a hard kill loses at most N updates.
#
#SBATCH --job-name=strip-mlp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8          # LAUNCH=srun: one task per GPU; LAUNCH=torchrun: set it to 1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10           # LAUNCH=srun: the loader workers of one GPU (see docs/clusters.md)
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to the same output files
#SBATCH --output=slurm-%j.out

set -euo pipefail
LAUNCH=${LAUNCH:-srun}
CFG=${1:?usage: sbatch tools/slurm_train.sh CONFIG [main.py options]}
shift

cd "${SLURM_SUBMIT_DIR:-.}"
export OMP_NUM_THREADS=1
# Every process's errors reach stderr with its rank; NCCL's own reports help on a hang.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

if [ "$LAUNCH" = torchrun ]; then
    # sed reads the whole list: "head" would end the pipe early, and pipefail would stop the script.
    HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    GPUS=${SLURM_GPUS_ON_NODE:-8}
    PORT=${MASTER_PORT:-29500}
    # One torchrun per node; "exec" lets torchrun receive SLURM's signals and pass them to its processes. It passes
    # on SIGUSR1 only when listed (unlisted, it dies of it and its processes never hear of the time limit), and
    # gives its processes --shutdown-timeout seconds to save before it kills them (its default: 30).
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec python -m torch.distributed.run \
        --nnodes="$SLURM_NNODES" --nproc_per_node="$1" --rdzv-backend=c10d --rdzv-endpoint="$2:$3" \
        --rdzv-id="$SLURM_JOB_ID" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=170 \
        main.py --cfg "${@:4}"' bash "$GPUS" "$HEAD" "$PORT" "$CFG" "$@"
else
    # One task per GPU; --kill-on-bad-exit stops the others when one task fails.
    srun --kill-on-bad-exit=1 python main.py --cfg "$CFG" "$@"
fi
