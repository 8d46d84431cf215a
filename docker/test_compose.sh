#!/usr/bin/env bash
# End-to-end test of `docker-compose up` with a real Docker engine.
#   docker/test_compose.sh              install what is missing, start dockerd,
#                                       build the images, run and check a cluster
#   docker/test_compose.sh --install    only install the tools (docker.io,
#                                       iptables, debootstrap, docker-compose)
#   docker/test_compose.sh --shards     the same with docker-compose.shards.yml:
#                                       two replay shards, checked both used
# Needs root for apt-get and dockerd. Stops the dockerd it started.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER_TEST_NAME=docker-test
source docker/lib.sh

install_tools
[ "${1:-}" = "--install" ] && exit 0

project=sactest$$
flagfile="$(mktemp /tmp/sac-test-flags.XXXXXX)"
export COMPOSE_PROJECT_NAME="$project" SAC_FLAGFILE="$flagfile"
files=(-f docker-compose.yml)
shards=0
if [ "${1:-}" = "--shards" ]; then
  files+=(-f docker-compose.shards.yml)
  shards=1
fi
compose() { docker-compose "${files[@]}" "$@"; }

cleanup() {
  compose down -v --timeout 5 >/dev/null 2>&1 || true
  rm -f "$flagfile"
  stop_dockerd
}
trap cleanup EXIT

start_dockerd
build_image

# The compose file as users run it; only the flagfile differs: small counts.
cat >"$flagfile" <<'FLAGS'
--env=MinitaurBulletEnv-v0
--replay_address=replay_server:8000
--port=8000
--num_actors=2
--train_steps=300
--initial_collect_steps=200
--replay_capacity=5000
--min_size_to_sample=200
--samples_per_insert=32
--batch_size=32
--actor_fc_layers=32,32
--critic_joint_fc_layers=32,32
--push_interval_steps=20
--pull_interval_steps=20
--policy_save_interval=100000
--eval_interval=100000
--num_eval_episodes=1
--video_episodes=0
--log_interval_s=2
FLAGS
chmod 644 "$flagfile"

say "docker-compose ${files[*]} up --scale actor=2"
if ! compose up -d --scale actor=2 >/dev/null; then
  server="$(compose ps -q replay_server)"
  [ -n "$server" ] && docker inspect --format '{{json .State.Health}}' "$server" | tail -c 1500 >&2
  compose logs --no-color --tail 40 replay_server >&2 || true
  fail "docker-compose up failed"
fi
learner="$(compose ps -q learner)"
[ -n "$learner" ] || fail "no learner container"
code="$(timeout 600 docker wait "$learner")" || fail "learner still running after 600s"
compose logs --no-color learner > /tmp/sac-learner.log 2>&1 || true
[ "$code" = "0" ] || { tail -n 30 /tmp/sac-learner.log >&2; fail "learner exited $code"; }
grep -q "learner: finished at train_step 300" /tmp/sac-learner.log || fail "learner did not reach 300 steps"
say "learner exited 0 at train_step 300"
grep -q "learner: memory allocator jemalloc" /tmp/sac-learner.log \
  || fail "the learner in the image does not run with jemalloc"

for cid in $(compose ps -q evaluator) $(compose ps -q actor); do
  timeout 120 docker wait "$cid" >/dev/null || fail "container $cid still running 120s after the learner"
done
compose logs --no-color actor > /tmp/sac-actors.log 2>&1 || true
ids="$(grep -oE 'actor [0-9]+: took index' /tmp/sac-actors.log | grep -oE '[0-9]+' | sort -u | tr '\n' ' ')"
[ "$(echo $ids | wc -w)" -ge 2 ] || fail "expected two actor indices, saw: $ids"
for i in $ids; do
  grep -qE "actor $i: (random|collect) +env_steps [1-9]" /tmp/sac-actors.log \
    || grep -qE "actor $i: training finished; [1-9][0-9]* env steps" /tmp/sac-actors.log \
    || fail "actor $i wrote no experience"
done
say "actors with indices $ids wrote to the replay table"
if [ "$shards" = 1 ]; then
  grep -q "learner: samples from 2 replay shards: replay_server:8000, replay_server_1:8000" /tmp/sac-learner.log \
    || fail "the learner did not sample both shards"
  grep -qE "actor [0-9]+: writes to replay shard 1 of 2 at replay_server_1:8000" /tmp/sac-actors.log \
    || fail "no actor wrote to the second shard"
  shard_log="$(compose logs --no-color replay_server_1 2>&1)"
  echo "$shard_log" | grep -q "serving tables" || fail "replay_server_1 did not serve"
  say "the learner sampled both shards; an actor wrote to replay_server_1"
fi

rows="$(docker run --rm -v "${project}_sac_data:/data:ro" --entrypoint python distributed-sac:latest \
  -c 'import json; rows=[json.loads(l) for l in open("/data/eval/metrics.jsonl")]; print(len(rows), rows[-1]["train_step"])')" \
  || fail "evaluator wrote no metrics.jsonl"
say "evaluator metrics: rows, last train_step = $rows"
[ "${rows#* }" -ge 300 ] || fail "evaluator did not evaluate the final train_step"

start=$(date +%s)
compose down -v --timeout 10 >/dev/null
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -le 15 ] || fail "docker-compose down took ${elapsed}s (limit 15s)"
say "docker-compose down took ${elapsed}s"
say "PASS"
