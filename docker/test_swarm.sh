#!/usr/bin/env bash
# End-to-end test of deploy/swarm/docker-stack.yml on a real single-node Swarm:
# 3 actor replicas take distinct indices, the learner's 2 workers (task slots
# 1 and 2, reaching each other by their slot's hostname) form one
# MultiWorkerMirroredStrategy group and train; the replay server's container
# is killed; Swarm restarts it, it restores its tables from its checkpoint
# volume, and the same learner workers and actors (never restarted) carry on:
# the chief finishes at --train_steps, train_step never reset, and the actors,
# which stop once the train_step the chief pushes reaches it, finish too.
# TensorBoard answers on the node's loopback only. Then `docker stack rm`
# leaves nothing running. Deploys with deploy/swarm/deploy.sh, as users do.
#   docker/test_swarm.sh    (after docker/test_compose.sh --install; root)
# Leaves the swarm and stops the dockerd it started.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER_TEST_NAME=swarm-test
source docker/lib.sh

started=$(date +%s)
stack=sacswarm$$
work="$(mktemp -d /tmp/sac-swarm.XXXXXX)"
swarm_started=""

logs() { docker service logs --raw --no-trunc "${stack}_$1" 2>&1 || true; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for svc in replay_server learner actor evaluator; do
      echo "----- ${stack}_${svc}: docker service logs --tail 60" >&2
      docker service logs --raw --no-trunc --tail 60 "${stack}_${svc}" 2>&1 \
        | grep -vE 'Gym|gym|^Please|^See|cuda|cuDNN|cuFFT|cuBLAS' >&2 || true
    done
  fi
  docker stack rm "$stack" >/dev/null 2>&1 || true
  for _ in $(seq 60); do
    [ -z "$(docker ps -aq -f "label=com.docker.stack.namespace=$stack")" ] && break
    sleep 1
  done
  # `docker stack rm` keeps volumes: drop this run's (checkpoints included),
  # so no later run restores them.
  for _ in $(seq 10); do
    vols="$(docker volume ls -q -f "label=com.docker.stack.namespace=$stack" 2>/dev/null || true)"
    [ -z "$vols" ] && break
    docker volume rm $vols >/dev/null 2>&1 || sleep 1
  done
  [ -n "$swarm_started" ] && docker swarm leave --force >/dev/null 2>&1 || true
  rm -rf "$work"
  stop_dockerd
  [ "$rc" -eq 0 ] || say "FAILED after $(( $(date +%s) - started ))s"
}
trap cleanup EXIT

install_tools
start_dockerd
build_image

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != "active" ]; then
  say "docker swarm init"
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  swarm_started=1
fi

# The stack as users deploy it; only the flagfile differs: small counts, a
# fast environment, a checkpoint every 3 s.
cat >"$work/cluster.flags" <<'FLAGS'
--env=Pendulum-v1
--replay_address=replay_server:8000
--port=8000
--num_actors=3
--train_steps=2000
--initial_collect_steps=300
--replay_capacity=20000
--min_size_to_sample=300
--samples_per_insert=32
--batch_size=32
--actor_fc_layers=32,32
--critic_joint_fc_layers=32,32
--push_interval_steps=20
--pull_interval_steps=20
--policy_save_interval=100000
--checkpoint_interval_steps=100000
--checkpoint_interval_s=3
--eval_interval=100000
--num_eval_episodes=1
--video_episodes=0
--log_interval_s=2
--server_timeout_s=180
FLAGS
chmod 644 "$work/cluster.flags"
# 3 actors: the actor service's replicas only (the learner's stay 2).
sed -e "s#file: ../../docker/cluster.flags#file: $work/cluster.flags#" \
    -e '/^  actor:/,/^  [a-z_]*:$/ s#replicas: 2#replicas: 3#' \
    deploy/swarm/docker-stack.yml >"$work/stack.yml"
[ "$(grep -c "replicas: 3" "$work/stack.yml")" -eq 1 ] \
  || fail "could not set 3 actor replicas"

# Deployed as the README says (deploy/swarm/deploy.sh labels this node for
# every placement constraint, then deploys); only the stack file differs.
say "deploy/swarm/deploy.sh ($stack: 3 actors, 2 learner workers)"
if ! SAC_STACK_FILE="$work/stack.yml" SAC_DEPLOY_ARGS="--resolve-image never" \
    deploy/swarm/deploy.sh "$stack" >"$work/deploy.log" 2>&1; then
  cat "$work/deploy.log" >&2; fail "deploy/swarm/deploy.sh failed"
fi

# Waits until `$2` (a command) succeeds; $1 seconds at most.
wait_for() {
  local limit=$1; shift
  for _ in $(seq "$limit"); do "$@" && return 0; sleep 1; done
  return 1
}
three_indices() {
  [ "$(logs actor | grep -oE 'actor [0-9]+: took index' | sort -u | wc -l)" -ge 3 ]
}
wait_for 240 three_indices || fail "3 actors did not take indices within 240s"
ids="$(logs actor | grep -oE 'took index [0-9]+' | grep -oE '[0-9]+' | sort -n | tr '\n' ' ')"
[ "$ids" = "0 1 2 " ] || fail "actor indices not distinct 0 1 2: $ids"
say "actors took indices $ids"

last_step() { logs learner | grep -oE 'learner: train_step [0-9]+/' | tail -n 1 | grep -oE '[0-9]+' || echo 0; }
training() { [ "$(last_step)" -ge 300 ]; }
wait_for 300 training || fail "the learner did not reach train_step 300"
checkpointed() { logs replay_server | grep -qE 'checkpoint \(periodic\) written .*uniform_table=[1-9]'; }
wait_for 60 checkpointed || fail "the replay server wrote no checkpoint"
sleep 4  # Past another checkpoint.

learner_ids="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_learner" | sort | tr '\n' ' ')"
actor_ids="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_actor" | sort | tr '\n' ' ')"
server_id="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_replay_server")"
[ -n "$server_id" ] || fail "replay server container not found"
[ "$(echo $learner_ids | wc -w)" -eq 2 ] || fail "expected 2 learner containers: $learner_ids"
[ "$(echo $actor_ids | wc -w)" -eq 3 ] || fail "expected 3 actor containers: $actor_ids"
# Slot s is worker s-1 of 2: its hostname is learner-s, its own entry of
# --learner_workers. Slot 1, worker 0, is the chief.
chief_id=""
for id in $learner_ids; do
  host="$(docker inspect -f '{{.Config.Hostname}}' "$id")"
  slot="${host#learner-}"
  # Through a file: `grep -q` stopping early would fail the pipe (pipefail).
  docker logs "$id" >"$work/learner-$id.log" 2>&1
  grep -q "learner: worker $((slot - 1)) of 2 " "$work/learner-$id.log" \
    || fail "the learner task with hostname $host is not worker $((slot - 1)) of 2"
  [ "$slot" = 1 ] && chief_id="$id"
done
[ -n "$chief_id" ] || fail "no learner task has hostname learner-1 (the chief)"
say "learner workers 0 (chief) and 1 on learner-1 and learner-2"
at_kill="$(last_step)"
say "killing the replay server's container at train_step $at_kill"
docker kill "$server_id" >/dev/null

new_id=""
new_server() {
  new_id="$(docker ps -q -f "label=com.docker.swarm.service.name=${stack}_replay_server")"
  [ -n "$new_id" ] && [ "$new_id" != "$server_id" ]
}
wait_for 120 new_server || fail "Swarm did not restart the replay server"
# The new container's own log: `checkpoints in DIR every Ns; restored: SIZES`.
restored_line() { docker logs "$new_id" 2>&1 | grep -oE 'checkpoints in .* restored: .*' | tail -n 1; }
restored() { [ -n "$(restored_line)" ]; }
wait_for 120 restored || fail "the restarted replay server did not log what it restored"
line="$(restored_line)"
say "restarted server: $line"
items="$(echo "$line" | grep -oE 'uniform_table=[0-9]+' | grep -oE '[0-9]+' || echo 0)"
[ "$items" -gt 0 ] || fail "the replay table came back empty: $line"
echo "$line" | grep -qE 'variables=[1-9]' || fail "the weights were not restored: $line"

# TensorBoard answers on the node's loopback, and on no other address.
tensorboard_up() { (exec 3<>/dev/tcp/127.0.0.1/6006) 2>/dev/null; }
wait_for 120 tensorboard_up || fail "TensorBoard does not answer on 127.0.0.1:6006"
for ip in $(hostname -I 2>/dev/null); do
  case "$ip" in 127.*|*:*) continue ;; esac
  if (exec 3<>"/dev/tcp/$ip/6006") 2>/dev/null; then
    fail "TensorBoard answers on $ip:6006: it must listen on the loopback only"
  fi
done
say "TensorBoard on 127.0.0.1:6006 only"

say "waiting for the learner to finish"
for id in $learner_ids; do
  code="$(timeout 400 docker wait "$id")" || fail "learner worker $id still running after 400s"
  if [ "$code" != "0" ]; then
    docker logs "$id" 2>&1 | grep -E 'learner: error|terminate called|what\(\)' \
      | tail -n 3 >&2 || true
    fail "learner worker $id exited $code"
  fi
done
# Both workers finish at --train_steps holding the same weights; the chief
# alone pushed them.
fingerprints=""
for id in $learner_ids; do
  docker logs "$id" >"$work/learner-$id.log" 2>&1
  finished="$(grep -oE 'learner: finished at train_step 2000 .*fingerprint [^ ]+' \
              "$work/learner-$id.log" | tail -n 1)"
  [ -n "$finished" ] || fail "learner worker $id did not finish at train_step 2000"
  fingerprints+="${finished##* } "
  pushed="$(grep -c 'learner: pushed initial weights' "$work/learner-$id.log" || true)"
  if [ "$id" = "$chief_id" ]; then
    [ "$pushed" -ge 1 ] || fail "the chief did not push its weights"
  else
    [ "$pushed" -eq 0 ] || fail "learner worker $id, not the chief, pushed weights"
  fi
done
[ "$(echo $fingerprints | tr ' ' '\n' | sort -u | wc -l)" -eq 1 ] \
  || fail "the learner workers end with different weights: $fingerprints"
cp "$work/learner-$chief_id.log" "$work/learner.log"
steps="$(grep -oE 'learner: train_step [0-9]+/' "$work/learner.log" | grep -oE '[0-9]+')"
echo "$steps" | sort -n -c 2>/dev/null || fail "train_step went backwards: $(echo $steps)"
after="$(echo "$steps" | awk -v k="$at_kill" '$1 > k' | wc -l)"
[ "$after" -ge 1 ] || fail "no learner progress line after the kill (at train_step $at_kill)"
[ "$(docker service ps -q "${stack}_learner" | wc -l)" -eq 2 ] || fail "a learner worker was restarted"
for id in $actor_ids; do
  code="$(timeout 120 docker wait "$id")" || fail "actor $id still running 120s after the learner"
  [ "$code" = "0" ] || fail "actor container $id exited $code"
done
[ "$(docker service ps -q "${stack}_actor" | wc -l)" -eq 3 ] || fail "an actor was restarted"
say "the same 2 learner workers (trained $at_kill -> 2000, never reset) and 3 actors finished"

docker stack rm "$stack" >/dev/null
gone() {
  [ -z "$(docker ps -aq -f "label=com.docker.stack.namespace=$stack")" ] &&
  [ -z "$(docker service ls -q -f "label=com.docker.stack.namespace=$stack")" ] &&
  [ -z "$(docker network ls -q -f "label=com.docker.stack.namespace=$stack")" ]
}
wait_for 60 gone || fail "docker stack rm left containers, services or networks"
say "docker stack rm left nothing running"
say "PASS in $(( $(date +%s) - started ))s"
