"""The embedded demo: the synthetic benchmark at CPU scale.

    python -m msrd_jax.train --config configs/synthetic.py --workdir workdirs/demo

resnet18 teacher at 128 px, trained on one category of the synthetic benchmark (generated
from photographs shipped in scikit-image into a cache folder on first use) and evaluated
at the end; about 3 minutes on 2 CPU cores (less once compiled programs are cached). The
teacher is random unless model.teacher_weights points at a port of ImageNet weights
(`python -m msrd_jax.port`).

Options after the colon: `configs/synthetic.py:CATEGORY` picks the category (brick, grass,
gravel, coffee, coins); `--config.data.root=DIR` uses any folder in the MVTec layout
(`configs/synthetic.py:widget --config.data.root=/data/my_parts` trains on
/data/my_parts/widget); an empty or missing DIR receives the benchmark instead.
"""

from msrd_jax.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.model.backbone = 'resnet18'
  c.data.dataset = 'synthetic'
  c.data.category = arg or 'brick'
  c.data.image_size = 128
  c.train.batch_size = 16
  c.train.epochs = 40
  c.train.checkpoint_every_steps = 50
  c.train.log_every_steps = 5
  c.eval.batch_size = 16
  return c
