import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

from tests.cluster import Cluster  # pylint: disable=g-import-not-at-top


@pytest.fixture
def cluster(tmp_path):
  c = Cluster(str(tmp_path))
  yield c
  c.stop_all()
