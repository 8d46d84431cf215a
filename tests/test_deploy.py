"""Fast checks of the deployment files: compose, Swarm stack, Kubernetes.

The real `docker-compose up` runs in docker/test_compose.sh (CI runs it after
these tests).
"""

import os
import re
import shutil
import subprocess

from absl import flags
import pytest
import yaml

from common import config as config_lib
from common import config_flags
from launcher.local_cluster import REPO_ROOT

K8S = os.path.join(REPO_ROOT, 'deploy', 'k8s')
SWARM_STACK = os.path.join(REPO_ROOT, 'deploy', 'swarm', 'docker-stack.yml')
FLAGS = flags.FLAGS


def _compose_command():
  if shutil.which('docker-compose'):
    return ['docker-compose']
  if shutil.which('docker') and subprocess.run(
      ['docker', 'compose', 'version'], capture_output=True).returncode == 0:
    return ['docker', 'compose']
  pytest.skip('neither docker-compose nor docker compose is installed '
              '(docker/test_compose.sh --install installs it)')


def _compose_config(*files):
  args = []
  for f in files:
    args += ['-f', os.path.join(REPO_ROOT, f)]
  out = subprocess.run(_compose_command() + args + ['config'], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return yaml.safe_load(out.stdout)


def test_compose_config_is_valid_and_safe():
  config = _compose_config('docker-compose.yml')
  services = config['services']
  assert set(services) == {'replay_server', 'learner', 'actor', 'evaluator',
                           'tensorboard'}
  for name, service in services.items():
    ports = service.get('ports', [])
    if name == 'tensorboard':
      published = [p if isinstance(p, str) else p.get('host_ip') for p in ports]
      assert published and all('127.0.0.1' in str(p) for p in published)
    else:
      assert not ports, f'{name} publishes {ports}: Reverb must stay internal'
  assert config['networks']['reverb'].get('internal') is True
  assert services['actor']['restart'] == 'on-failure'
  assert '--task=auto' in services['actor']['command']
  for name in ('learner', 'actor', 'evaluator'):
    depends = services[name]['depends_on']
    assert depends['replay_server']['condition'] == 'service_healthy'
  assert 'healthcheck' in services['replay_server']


def test_gpu_override_reserves_a_gpu_for_a_mirrored_learner():
  learner = _compose_config('docker-compose.yml',
                            'docker-compose.gpu.yml')['services']['learner']
  assert '--strategy=mirrored' in learner['command']
  devices = learner['deploy']['resources']['reservations']['devices']
  assert any('gpu' in d['capabilities'] for d in devices)


def test_shards_override_runs_a_second_replay_server_for_every_client():
  config = _compose_config('docker-compose.yml', 'docker-compose.shards.yml')
  services = config['services']
  shard = services['replay_server_1']
  first = services['replay_server']
  assert shard['image'] == first['image'] and 'healthcheck' in shard
  assert not shard.get('ports'), 'Reverb must stay internal'
  assert shard['networks'] == first['networks']
  checkpoints = [
      [a for a in s['command'] if a.startswith('--checkpoint_dir=')]
      for s in (first, shard)]
  assert checkpoints[0] != checkpoints[1], checkpoints
  for name in ('learner', 'actor', 'evaluator'):
    command = services[name]['command']
    assert ('--replay_address=replay_server:8000,replay_server_1:8000'
            in command), (name, command)
    # After the flagfile, so it wins over the flagfile's single address.
    assert command.index('--flagfile=/config/cluster.flags') < next(
        i for i, a in enumerate(command) if a.startswith('--replay_address'))
    for server in ('replay_server', 'replay_server_1'):
      assert services[name]['depends_on'][server]['condition'] == (
          'service_healthy')
  assert '--task=auto' in services['actor']['command']


def _k8s_documents():
  with open(os.path.join(K8S, 'kustomization.yaml')) as f:
    kustomization = yaml.safe_load(f)
  docs = []
  for resource in kustomization['resources']:
    with open(os.path.join(K8S, resource)) as f:
      docs += [d for d in yaml.safe_load_all(f) if d]
  return kustomization, docs


def test_kubernetes_manifests_are_consistent():
  kustomization, docs = _k8s_documents()
  for generator in kustomization['configMapGenerator']:
    for f in generator['files']:
      assert os.path.exists(os.path.join(K8S, f))
  by_kind = {}
  for doc in docs:
    assert doc['apiVersion'] and doc['kind'] and doc['metadata']['name']
    by_kind.setdefault(doc['kind'], {})[doc['metadata']['name']] = doc
  deployments = by_kind['Deployment']
  assert {'replay-server', 'actor', 'evaluator'} <= set(deployments)
  assert 'learner' in by_kind['StatefulSet']
  assert deployments['actor']['spec']['replicas'] >= 2
  claims = set(by_kind.get('PersistentVolumeClaim', {}))
  workloads = dict(deployments, **by_kind['StatefulSet'])
  for name, workload in workloads.items():
    spec = workload['spec']
    templates = {t['metadata']['name'] for t in spec.get(
        'volumeClaimTemplates', [])}
    labels = spec['template']['metadata']['labels']
    for key, value in spec['selector']['matchLabels'].items():
      assert labels.get(key) == value, f'{name}: selector does not match'
    pod = spec['template']['spec']
    volumes = {v['name']: v for v in pod.get('volumes', [])}
    for container in pod['containers']:
      assert container['image'] == 'distributed-sac'
      for mount in container.get('volumeMounts', []):
        assert mount['name'] in set(volumes) | templates, (
            f'{name}: no volume {mount["name"]}')
      if container['name'] != 'tensorboard':
        assert '--flagfile=/config/cluster.flags' in container['args']
    for volume in volumes.values():
      if 'persistentVolumeClaim' in volume:
        assert volume['persistentVolumeClaim']['claimName'] in claims
  assert '--task=auto' in (
      deployments['actor']['spec']['template']['spec']['containers'][0]['args'])
  service = by_kind['Service']['replay-server']
  server_pod = deployments['replay-server']['spec']['template']
  assert service['spec']['type'] == 'ClusterIP'
  for key, value in service['spec']['selector'].items():
    assert server_pod['metadata']['labels'][key] == value
  container_ports = {p['name']: p['containerPort']
                     for p in server_pod['spec']['containers'][0]['ports']}
  port = service['spec']['ports'][0]
  assert container_ports[port['targetPort']] == port['port'] == 8000
  # Its tables survive a pod restart: checkpoints on a claimed volume.
  server = server_pod['spec']['containers'][0]
  checkpoint = [a for a in server['args'] if a.startswith('--checkpoint_dir=')]
  assert len(checkpoint) == 1
  mounts = {m['mountPath']: m['name'] for m in server['volumeMounts']}
  volume = {v['name']: v for v in server_pod['spec']['volumes']}[
      mounts['/checkpoints']]
  assert checkpoint[0].split('=', 1)[1].startswith('/checkpoints/')
  assert volume['persistentVolumeClaim']['claimName'] == 'replay-checkpoints'
  with open(os.path.join(K8S, 'cluster.flags')) as f:
    flags = f.read()
  assert re.search(r'^--replay_address=replay-server:8000$', flags, re.M)


def test_kubernetes_shards_overlay_adds_a_shard_every_client_samples():
  """deploy/k8s-shards: the base stack plus a StatefulSet of shards."""
  if not shutil.which('kubectl'):
    pytest.skip('kubectl is not installed (kustomize builds offline with it)')
  out = subprocess.run(
      ['kubectl', 'kustomize', os.path.join(REPO_ROOT, 'deploy', 'k8s-shards')],
      capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  docs = [d for d in yaml.safe_load_all(out.stdout) if d]
  by_kind = {}
  for doc in docs:
    if doc['kind'] != 'Namespace':
      assert doc['metadata'].get('namespace') == 'distributed-sac', doc[
          'metadata']
    by_kind.setdefault(doc['kind'], {})[doc['metadata']['name']] = doc
  shards = by_kind['StatefulSet']['replay-shard']
  service = by_kind['Service'][shards['spec']['serviceName']]
  assert service['spec']['clusterIP'] == 'None'  # One DNS name per pod.
  pod = shards['spec']['template']
  for key, value in service['spec']['selector'].items():
    assert pod['metadata']['labels'][key] == value
  # The base's ClusterIP service must not route to the shards.
  base_selector = by_kind['Service']['replay-server']['spec']['selector']
  assert any(pod['metadata']['labels'].get(k) != v
             for k, v in base_selector.items())
  assert shards['spec']['volumeClaimTemplates']
  assert by_kind['NetworkPolicy']['replay-shard-namespace-only']
  expected = ['replay-server:8000'] + [
      f'replay-shard-{i}.replay-shard:8000'
      for i in range(shards['spec']['replicas'])]
  clients = [by_kind['Deployment']['actor'], by_kind['Deployment']['evaluator'],
             by_kind['StatefulSet']['learner']]
  for client in clients:
    name = client['metadata']['name']
    args = client['spec']['template']['spec']['containers'][0]['args']
    assert args[-1] == '--replay_address=' + ','.join(expected), (name, args)
    assert '--flagfile=/config/cluster.flags' in args[:-1]


def test_swarm_stack_parses_and_scales_actors():
  path = SWARM_STACK
  with open(path) as f:
    stack = yaml.safe_load(f)
  assert stack['version'].startswith('3')
  services = stack['services']
  assert services['actor']['deploy']['replicas'] >= 2
  assert '--task=auto' in services['actor']['command']
  for name in ('replay_server', 'learner', 'actor', 'evaluator'):
    assert 'ports' not in services[name]
  flags_file = os.path.normpath(os.path.join(
      os.path.dirname(path), stack['configs']['cluster_flags']['file']))
  assert os.path.exists(flags_file)
  # A restarted replay server restores its tables from a volume, and is
  # reached by DNS (no IPVS virtual IP).
  server = services['replay_server']
  assert '--checkpoint_dir=/data/replay_checkpoints' in server['command']
  assert server['volumes'] == ['replay_data:/data']
  assert 'replay_data' in stack['volumes']
  assert server['deploy']['endpoint_mode'] == 'dnsrr'
  if shutil.which('docker'):
    out = subprocess.run(['docker', 'stack', 'config', '-c', path],
                         capture_output=True, text=True, timeout=60)
    if 'unknown command' not in out.stderr:
      assert out.returncode == 0, out.stderr


def test_every_cluster_flag_in_the_flagfiles_exists():
  """The flagfiles name only flags the binaries define (absl would refuse)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from common import config_flags  # pylint: disable=g-import-not-at-top,unused-import
  known = set(flags.FLAGS)
  for path in ('docker/cluster.flags', 'deploy/k8s/cluster.flags'):
    with open(os.path.join(REPO_ROOT, path)) as f:
      for line in f:
        line = line.strip()
        if line and not line.startswith('#'):
          name = line[2:].split('=')[0]
          assert name in known, f'{path}: unknown flag --{name}'


def test_every_package_is_installed_by_pyproject():
  """The Docker image installs with `pip install .`: a subpackage missing
  from pyproject.toml imports in a checkout but not in the image."""
  import tomllib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'pyproject.toml'), 'rb') as f:
    listed = set(tomllib.load(f)['tool']['setuptools']['packages'])
  found = set()
  for top in listed:
    for path, dirs, files in os.walk(os.path.join(root, top)):
      dirs[:] = [d for d in dirs if d != '__pycache__']
      if '__init__.py' in files:
        found.add(os.path.relpath(path, root).replace(os.sep, '.'))
  assert found <= listed, sorted(found - listed)


def _dockerfile_user():
  """The uid and gid the image runs as (its last USER line, numeric)."""
  with open(os.path.join(REPO_ROOT, 'docker', 'Dockerfile')) as f:
    users = re.findall(r'^USER\s+(\S+)', f.read(), re.M)
  assert users, 'docker/Dockerfile has no USER line: the image runs as root'
  uid, _, gid = users[-1].partition(':')
  # Numeric: Kubernetes can verify runAsNonRoot only for a numeric user.
  assert uid.isdigit() and int(uid) > 0, users[-1]
  assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]
  return int(uid), int(gid) if gid else None


def _kustomize(directory):
  if not shutil.which('kubectl'):
    pytest.skip('kubectl is not installed (kustomize builds offline with it)')
  out = subprocess.run(
      ['kubectl', 'kustomize', os.path.join(REPO_ROOT, 'deploy', directory)],
      capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize('directory', ['k8s', 'k8s-shards', 'k8s-one-learner'])
def test_kubernetes_pods_run_as_non_root_on_a_read_only_root(directory):
  """Every container of every pod: the image's non-root user, no privilege
  escalation, no capabilities, a read-only root filesystem, and a writable
  emptyDir /tmp (the image's caches go there)."""
  uid, gid = _dockerfile_user()
  pods = [(d['metadata']['name'], d['spec']['template']['spec'])
          for d in _kustomize(directory)
          if d['kind'] in ('Deployment', 'StatefulSet', 'DaemonSet', 'Job')]
  assert len(pods) >= 4, [name for name, _ in pods]
  for name, pod in pods:
    pod_context = pod.get('securityContext', {})
    assert pod_context.get('runAsNonRoot') is True, (name, pod_context)
    assert pod_context.get('runAsUser') == uid, (name, pod_context)
    if gid is not None:
      assert pod_context.get('runAsGroup') == gid, (name, pod_context)
    # Volumes are writable by the image's group.
    assert pod_context.get('fsGroup') == (gid or uid), (name, pod_context)
    volumes = {v['name']: v for v in pod.get('volumes', [])}
    for container in pod['containers'] + pod.get('initContainers', []):
      where = f'{name}/{container["name"]}'
      context = container.get('securityContext', {})
      assert context.get('allowPrivilegeEscalation') is False, (where, context)
      assert context.get('readOnlyRootFilesystem') is True, (where, context)
      assert 'ALL' in context.get('capabilities', {}).get('drop', []), (
          where, context)
      assert context.get('runAsUser', uid) != 0, (where, context)
      mounts = {m['mountPath']: m for m in container.get('volumeMounts', [])}
      assert '/tmp' in mounts and not mounts['/tmp'].get('readOnly'), where
      assert 'emptyDir' in volumes[mounts['/tmp']['name']], where


def _swarm_stack():
  with open(SWARM_STACK) as f:
    return yaml.safe_load(f)


def test_swarm_stack_publishes_no_port_and_tensorboard_stays_on_loopback():
  """Swarm publishes a port on every interface of a node (host mode) or of
  every node (ingress) and cannot bind it to the loopback: so no port at all.
  TensorBoard listens on the loopback of its node's host network."""
  stack = _swarm_stack()
  for name, service in stack['services'].items():
    assert not service.get('ports'), f'{name} publishes {service["ports"]}'
    command = ' '.join(service.get('command', []))
    assert '--bind_all' not in command, (name, command)
  tensorboard = stack['services']['tensorboard']
  assert '--host=127.0.0.1' in tensorboard['command']
  networks = tensorboard['networks']
  assert len(networks) == 1, networks
  network = stack['networks'][networks[0]]
  assert network.get('external') and network.get('name') == 'host', network


def test_tensorboard_listens_on_loopback_in_every_deployment():
  """Kubernetes: the pod's loopback (kubectl port-forward reaches it);
  compose: published on 127.0.0.1 only."""
  if shutil.which('kubectl'):
    for doc in _kustomize('k8s'):
      if doc['kind'] != 'Deployment':
        continue
      for container in doc['spec']['template']['spec']['containers']:
        if container['name'] == 'tensorboard':
          assert '--host=127.0.0.1' in container['args'], container
          assert '--bind_all' not in container['args'], container
  with open(os.path.join(REPO_ROOT, 'docker-compose.yml')) as f:
    compose = yaml.safe_load(f)
  for name, service in compose['services'].items():
    for port in service.get('ports', []):
      assert str(port).startswith('127.0.0.1:'), (name, port)


def test_compose_restarts_a_failed_learner_and_leaves_a_finished_one_down():
  """on-failure: a crashed learner restarts and resumes from the checkpoint
  on its volume; one that finished (exit 0) is not started again."""
  with open(os.path.join(REPO_ROOT, 'docker-compose.yml')) as f:
    compose = yaml.safe_load(f)
  learner = compose['services']['learner']
  assert learner.get('restart') == 'on-failure', learner.get('restart')
  # Resumes: its --root_dir is on a named volume, not the container's layer.
  assert '--root_dir=/data' in learner['command']
  assert any(str(v).startswith('sac_data:/data') for v in learner['volumes'])
  swarm = _swarm_stack()['services']['learner']['deploy']['restart_policy']
  assert swarm == {'condition': 'on-failure'}, swarm


def _placement_labels(stack):
  """{(label, value)} of every `node.labels.X == Y` constraint."""
  labels = set()
  for service in stack['services'].values():
    placement = service.get('deploy', {}).get('placement', {})
    for constraint in placement.get('constraints', []):
      m = re.fullmatch(r'\s*node\.labels\.(\S+?)\s*==\s*(\S+)\s*', constraint)
      if m:
        labels.add(m.groups())
  return labels


def _run_deploy_script(tmp_path, args=(), env=None):
  """deploy/swarm/deploy.sh with a `docker` on the PATH that records its
  arguments (no Docker engine here; docker/test_swarm.sh runs the real one)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  fake = bin_dir / 'docker'
  fake.write_text('#!/bin/sh\n'
                  f'echo "$*" >> {calls}\n'
                  'if [ "$1" = info ]; then echo this-node; fi\n')
  fake.chmod(0o755)
  out = subprocess.run(
      [os.path.join(REPO_ROOT, 'deploy', 'swarm', 'deploy.sh')] + list(args),
      capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
      env=dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
               **(env or {})))
  recorded = calls.read_text().splitlines() if calls.exists() else []
  return out, recorded


def test_swarm_deploy_script_labels_every_node_the_stack_is_pinned_to(
    tmp_path):
  """A service whose placement label no node carries stays Pending: the one
  deploy step (README and docker/test_swarm.sh) labels every one of them."""
  stack_path = SWARM_STACK
  labels = _placement_labels(_swarm_stack())
  assert ('sac.replay', 'true') in labels and ('sac.eval', 'true') in labels
  out, calls = _run_deploy_script(tmp_path, ['sac', 'node-a', 'node-b'])
  assert out.returncode == 0, out.stderr
  added = set()
  for call in calls:
    m = re.fullmatch(r'node update --label-add (\S+)=(\S+) (\S+)', call)
    if m:
      added.add(m.groups())
  assert {(label, value) for label, value, _ in added} == labels, calls
  assert ('sac.replay', 'true', 'node-a') in added, calls
  assert ('sac.eval', 'true', 'node-b') in added, calls
  # Labels first, then the stack, from the stack file beside the script.
  assert calls[-1] == f'stack deploy -c {stack_path} sac', calls
  # Defaults: this node for every label, stack `sac`.
  (tmp_path / 'defaults').mkdir()
  out, calls = _run_deploy_script(tmp_path / 'defaults')
  assert out.returncode == 0, out.stderr
  assert all(c.endswith(' this-node') for c in calls
             if c.startswith('node update')), calls
  assert calls[-1].endswith(' sac'), calls


def test_swarm_deploy_script_refuses_a_label_it_does_not_set(tmp_path):
  stack = tmp_path / 'stack.yml'
  with open(SWARM_STACK) as f:
    stack.write_text(f.read().replace('node.labels.sac.eval == true',
                                      'node.labels.sac.gpu == true'))
  out, calls = _run_deploy_script(tmp_path,
                                  env={'SAC_STACK_FILE': str(stack)})
  assert out.returncode == 2, (out.stdout, out.stderr)
  errors = out.stderr.strip().splitlines()
  assert len(errors) == 1 and 'node.labels.sac.gpu' in errors[0], errors
  assert not any(c.startswith('stack deploy') for c in calls), calls


def test_readme_swarm_steps_are_the_ones_ci_runs():
  """The README deploys with deploy/swarm/deploy.sh, as docker/test_swarm.sh
  does; a bare `docker stack deploy -c` in either must come with a
  `--label-add` for every placement label of the stack."""
  with open(os.path.join(REPO_ROOT, 'README.md')) as f:
    readme = f.read()
  with open(os.path.join(REPO_ROOT, 'docker', 'test_swarm.sh')) as f:
    ci = f.read()
  assert 'deploy/swarm/deploy.sh' in readme
  assert re.search(r'^[^#\n]*deploy/swarm/deploy\.sh', ci, re.M), (
      'docker/test_swarm.sh does not deploy with deploy/swarm/deploy.sh')
  for text, where in ((readme, 'README.md'), (ci, 'docker/test_swarm.sh')):
    if re.search(r'docker stack deploy\s.*(-c|--compose-file)\s', text):
      for label, value in _placement_labels(_swarm_stack()):
        assert f'--label-add {label}={value}' in text, (
            f'{where} runs docker stack deploy without labelling a node '
            f'{label}={value}: that service would stay Pending')


# --- The learner as a group of workers (--strategy=multi_worker).


@pytest.fixture
def learner_config():
  """The LearnerConfig a learner started with `args` runs with: the real
  flags parse them, with the flagfile a deployment mounts at
  /config/cluster.flags read from `flagfile` in this checkout. The global
  flags are unparsed afterwards."""

  def build(args, flagfile):
    args = [a.replace('=/config/cluster.flags', '=' + flagfile)
            if a.startswith('--flagfile=') else a for a in args]
    FLAGS.unparse_flags()
    FLAGS(['learner'] + list(args))
    return config_flags.build(config_lib.LearnerConfig)

  yield build
  FLAGS.unparse_flags()


def _kubelet_expand(arg, env):
  """`$(NAME)` in a container's args, as the kubelet expands it."""
  return re.sub(r'\$\(([A-Za-z_][A-Za-z0-9_]*)\)',
                lambda m: env.get(m.group(1), m.group(0)), arg)


def _kustomize_by_kind(directory):
  """{kind: {name: document}} of `kubectl kustomize deploy/<directory>`."""
  by_kind = {}
  for doc in _kustomize(directory):
    by_kind.setdefault(doc['kind'], {})[doc['metadata']['name']] = doc
  return by_kind


@pytest.mark.parametrize('directory', ['k8s', 'k8s-shards'])
def test_kubernetes_learner_workers_are_a_statefulset_behind_a_headless_service(
    directory, learner_config):
  """Pod learner-i is learner-i.learner-workers: every worker gets the same
  --learner_workers, one entry per replica, its own entry at its pod-index;
  the chief's --root_dir is on a claimed volume."""
  by_kind = _kustomize_by_kind(directory)
  assert 'learner' not in by_kind['Deployment']
  learner = by_kind['StatefulSet']['learner']
  spec = learner['spec']
  replicas = spec['replicas']
  assert replicas == 2, replicas
  # Every worker at once: each waits for the others.
  assert spec['podManagementPolicy'] == 'Parallel'
  service = by_kind['Service'][spec['serviceName']]
  assert spec['serviceName'] == 'learner-workers'
  assert service['spec']['clusterIP'] == 'None'  # One DNS name per pod.
  # The workers find each other while they start, before any is ready.
  assert service['spec']['publishNotReadyAddresses'] is True
  pod = spec['template']
  for key, value in service['spec']['selector'].items():
    assert pod['metadata']['labels'][key] == value
  for other in ('replay-server', 'replay-shard'):
    if other in by_kind['Service']:
      selector = by_kind['Service'][other]['spec']['selector']
      assert any(pod['metadata']['labels'].get(k) != v
                 for k, v in selector.items()), other
  container = pod['spec']['containers'][0]
  ports = {p['name']: p['containerPort'] for p in container['ports']}
  (service_port,) = service['spec']['ports']
  port = ports[service_port['targetPort']]
  assert service_port['port'] == port
  env = {e['name']: e for e in container.get('env', [])}
  index_env = [name for name, e in env.items()
               if e.get('valueFrom', {}).get('fieldRef', {}).get(
                   'fieldPath') ==
               "metadata.labels['apps.kubernetes.io/pod-index']"]
  assert len(index_env) == 1, env
  assert f'--learner_index=$({index_env[0]})' in container['args']
  assert container['args'][0] == 'learner'
  flagfile = os.path.join(K8S, 'cluster.flags')
  lists = set()
  for i in range(replicas):
    args = [_kubelet_expand(a, {index_env[0]: str(i)})
            for a in container['args'][1:]]
    config = learner_config(args, flagfile)
    assert config.strategy == 'multi_worker'
    assert config.learner_index == i
    assert len(config.learner_workers) == replicas, config.learner_workers
    assert config.learner_workers[i] == (
        f'learner-{i}.{spec["serviceName"]}:{port}')
    lists.add(config.learner_workers)
    root_dir = config.root_dir
  assert len(lists) == 1, lists  # The same list, in the same order.
  mounts = {m['mountPath']: m['name'] for m in container['volumeMounts']}
  templates = {t['metadata']['name'] for t in spec['volumeClaimTemplates']}
  assert mounts[root_dir] in templates, (root_dir, mounts, templates)


def test_kubernetes_learner_workers_admit_only_one_another():
  """The collective port has no authentication: one NetworkPolicy selects
  the learner's pods and admits only the learner's pods."""
  by_kind = _kustomize_by_kind('k8s')
  learner = by_kind['StatefulSet']['learner']['spec']
  labels = learner['template']['metadata']['labels']
  policies = [p for p in by_kind['NetworkPolicy'].values()
              if p['spec']['podSelector']['matchLabels'].items()
              <= labels.items()]
  assert len(policies) == 1, policies
  assert policies[0]['spec']['policyTypes'] == ['Ingress']
  (rule,) = policies[0]['spec']['ingress']
  assert rule['from'] == [{'podSelector': {
      'matchLabels': learner['selector']['matchLabels']}}], rule


def test_kubernetes_one_learner_overlay_runs_the_default_strategy(
    learner_config):
  by_kind = _kustomize_by_kind('k8s-one-learner')
  learner = by_kind['StatefulSet']['learner']
  assert learner['spec']['replicas'] == 1
  args = learner['spec']['template']['spec']['containers'][0]['args']
  assert args[0] == 'learner'
  config = learner_config(args[1:], os.path.join(K8S, 'cluster.flags'))
  assert config.strategy == 'default' and not config.learner_workers
  assert config.root_dir == '/data'
  assert set(by_kind['Deployment']) == {'replay-server', 'actor', 'evaluator'}


def _swarm_worker_args(service, slot, tmp_path):
  """The learner's arguments in the task of `slot`: its `sh -c` command run
  by a real shell, with the slot in the environment as Swarm sets it and a
  `python` that prints its arguments."""
  bin_dir = tmp_path / 'bin'
  if not bin_dir.exists():
    bin_dir.mkdir()
    fake = bin_dir / 'python'
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@"\n')
    fake.chmod(0o755)
  (command,) = service['command']
  # `$$` is the stack file's escape for a `$` that the shell expands.
  command = command.replace('$$', '$')
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')
  for name, value in service.get('environment', {}).items():
    env[name] = value.replace('{{.Task.Slot}}', str(slot))
  out = subprocess.run(service['entrypoint'] + [command], env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  args = out.stdout.splitlines()
  assert args[:2] == ['-m', 'learner'], args
  return args[2:]


def test_swarm_learner_workers_agree_on_learner_workers(tmp_path,
                                                        learner_config):
  """Task slot s (1..N) is worker s-1: its hostname (a DNS name on the
  overlay network) is its own entry of a --learner_workers that every task
  gets alike, one entry per replica."""
  stack = _swarm_stack()
  learner = stack['services']['learner']
  replicas = learner['deploy']['replicas']
  assert replicas == 2, replicas
  # `python -m` is the image's ENTRYPOINT: a shell computes the index from
  # the slot, then execs Python (which gets SIGTERM directly).
  assert learner['entrypoint'] == ['sh', '-c']
  assert learner['command'][0].startswith('exec python -m learner ')
  assert '{{.Task.Slot}}' in learner['hostname']
  assert learner['networks'] == stack['services']['replay_server']['networks']
  flagfile = os.path.normpath(os.path.join(
      os.path.dirname(SWARM_STACK), stack['configs']['cluster_flags']['file']))
  lists = set()
  for slot in range(1, replicas + 1):
    config = learner_config(_swarm_worker_args(learner, slot, tmp_path),
                            flagfile)
    assert config.strategy == 'multi_worker'
    assert config.learner_index == slot - 1
    assert len(config.learner_workers) == replicas, config.learner_workers
    host = learner['hostname'].replace('{{.Task.Slot}}', str(slot))
    assert config.learner_workers[slot - 1].rsplit(':', 1)[0] == host
    assert config.root_dir == '/data'
    lists.add(config.learner_workers)
  assert len(lists) == 1, lists  # The same list, in the same order.
  assert 'learner_data:/data' in learner['volumes']
  # A group restarts as a whole; an update replaces every worker at once.
  assert learner['deploy']['restart_policy'] == {'condition': 'on-failure'}
  assert learner['deploy']['update_config']['parallelism'] == 0
  if shutil.which('docker'):
    # Docker's own reading of the file: the same command, `$$` unescaped.
    out = subprocess.run(['docker', 'stack', 'config', '-c', SWARM_STACK],
                         capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
      parsed = yaml.safe_load(out.stdout)['services']['learner']
      assert parsed['command'] == [learner['command'][0].replace('$$', '$')]
      assert parsed['hostname'] == learner['hostname']
