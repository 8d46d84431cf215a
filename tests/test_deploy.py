"""Fast checks of the deployment files: compose, Swarm stack, Kubernetes.

The real `docker-compose up` runs in docker/test_compose.sh (CI runs it after
these tests).
"""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.cluster import REPO_ROOT

K8S = os.path.join(REPO_ROOT, 'deploy', 'k8s')


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
  assert {'replay-server', 'learner', 'actor', 'evaluator'} <= set(deployments)
  assert deployments['actor']['spec']['replicas'] >= 2
  claims = set(by_kind.get('PersistentVolumeClaim', {}))
  for name, deployment in deployments.items():
    spec = deployment['spec']
    labels = spec['template']['metadata']['labels']
    for key, value in spec['selector']['matchLabels'].items():
      assert labels.get(key) == value, f'{name}: selector does not match'
    pod = spec['template']['spec']
    volumes = {v['name']: v for v in pod.get('volumes', [])}
    for container in pod['containers']:
      assert container['image'] == 'distributed-sac'
      for mount in container.get('volumeMounts', []):
        assert mount['name'] in volumes, f'{name}: no volume {mount["name"]}'
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
  for name in ('learner', 'actor', 'evaluator'):
    args = by_kind['Deployment'][name]['spec']['template']['spec'][
        'containers'][0]['args']
    assert args[-1] == '--replay_address=' + ','.join(expected), (name, args)
    assert '--flagfile=/config/cluster.flags' in args[:-1]


def test_swarm_stack_parses_and_scales_actors():
  path = os.path.join(REPO_ROOT, 'deploy', 'swarm', 'docker-stack.yml')
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
  from common import cluster_flags  # pylint: disable=g-import-not-at-top,unused-import
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
