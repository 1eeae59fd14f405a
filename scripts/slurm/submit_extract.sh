#!/bin/bash
# Submit a sharded extraction as a Slurm job array and a merge job that runs when every shard succeeded.
#   ANNOTATIONS=EPIC_100_train.csv VIDEOS=/data/EPIC-KITCHENS OUT=/scratch/train.h5 \
#   EXTRACT_ARGS="--model ViT-B-16 --pretrained openai --frames 16" bash submit_extract.sh 16
# After a crash or a pre-emption, run the same command again: every shard resumes where it stopped.
set -euo pipefail
shards=${1:?usage: submit_extract.sh N_SHARDS}
here=$(cd "$(dirname "$0")" && pwd)
export ANNOTATIONS VIDEOS OUT EXTRACT_ARGS
jid=$(sbatch --parsable --export=ALL --array=0-$((shards - 1)) "$here/extract_array.sbatch")
jid=${jid%%;*}  # --parsable prints "id" or "id;cluster"
sbatch --export=ALL --dependency=afterok:"$jid" "$here/merge.sbatch"
echo "extraction array $jid ($shards shards), merge queued after it"
