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

from launcher.local_cluster import REPO_ROOT

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


@pytest.mark.parametrize('directory', ['k8s', 'k8s-shards'])
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
  with open(os.path.join(REPO_ROOT, 'deploy', 'swarm',
                         'docker-stack.yml')) as f:
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
  stack_path = os.path.join(REPO_ROOT, 'deploy', 'swarm', 'docker-stack.yml')
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
  with open(os.path.join(REPO_ROOT, 'deploy', 'swarm',
                         'docker-stack.yml')) as f:
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
