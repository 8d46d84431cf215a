#!/usr/bin/env bash
# Deploys the Swarm stack: labels the nodes its placement constraints name,
# then `docker stack deploy`. The README's steps and docker/test_swarm.sh both
# run this script, so what a user runs is what CI runs.
#   deploy/swarm/deploy.sh [STACK [REPLAY_NODE [EVAL_NODE]]]
# Run it on a manager. STACK defaults to sac; REPLAY_NODE (the replay server
# and its checkpoint volume) defaults to this node, EVAL_NODE (the evaluator,
# its volume and TensorBoard) to REPLAY_NODE.
# SAC_STACK_FILE: another stack file (default: docker-stack.yml beside this
# script); SAC_DEPLOY_ARGS: more `docker stack deploy` options.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
stack="${1:-sac}"
self="$(docker info --format '{{.Swarm.NodeID}}')"
if [ -z "$self" ]; then
  echo "deploy.sh: error: this machine is not in a swarm; run \`docker swarm init\` (or join one) first" >&2
  exit 2
fi
replay_node="${2:-$self}"
eval_node="${3:-$replay_node}"
stack_file="${SAC_STACK_FILE:-$here/docker-stack.yml}"

# Label -> node. Every `node.labels.X == Y` constraint of the stack file must
# be here, or its service would wait in Pending ("no suitable node") forever.
declare -A node_of=([sac.replay]="$replay_node" [sac.eval]="$eval_node")
constraints="$(grep -oE 'node\.labels\.[A-Za-z0-9._-]+ *== *[A-Za-z0-9._-]+' \
               "$stack_file" | tr -d ' ' | sort -u)"
for constraint in $constraints; do
  label="${constraint#node.labels.}"; value="${label#*==}"; label="${label%%==*}"
  if [ -z "${node_of[$label]:-}" ]; then
    echo "deploy.sh: error: $stack_file constrains a service to node.labels.$label, which this script does not set; add it to node_of in $0" >&2
    exit 2
  fi
  docker node update --label-add "$label=$value" "${node_of[$label]}" >/dev/null
  echo "deploy.sh: node ${node_of[$label]} labelled $label=$value"
done

# shellcheck disable=SC2086  # SAC_DEPLOY_ARGS holds several options.
docker stack deploy ${SAC_DEPLOY_ARGS:-} -c "$stack_file" "$stack"
