#!/bin/bash
# Rendered by `aift launch` from slurm/sbatch.sh.j2 for cluster profile 'aifactory_h100'.
#SBATCH --job-name=golden
#SBATCH --partition=gpu_h100
#SBATCH --account=aif-regional
#SBATCH --qos=normal
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=/scratch/aif/run1/slurm/%x-%j.out
#SBATCH --error=/scratch/aif/run1/slurm/%x-%j.err
# --signal without "B:" sends the requeue signal to every rank (srun's tasks), not only to this batch shell.

set -euo pipefail
export NCCL_DEBUG=WARN
export NCCL_IB_DISABLE=0
export NCCL_SOCKET_IFNAME=ib0
export GLOO_SOCKET_IFNAME=ib0
export OMP_NUM_THREADS=16
# The first node of the allocation is the rendezvous point, unless the site sets MASTER_ADDR.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# srun starts one process per device (4 x 4); Lightning reads ranks from Slurm.
srun --kill-on-bad-exit=1 aift train recipe=plastic_sorting cluster=aifactory_h100 strategy=ddp ckpt_path=auto trainer.devices=4 trainer.num_nodes=4 hydra.run.dir=/scratch/aif/run1

