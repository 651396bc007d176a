"""TensorFlow runtime settings comln_tf chooses for its process.

Imported first by `comln_tf/__init__.py`, before TensorFlow creates its
CPU device (it reads these variables then). A variable already set, by
the user or the environment, is left as it is.

TF_CPU_ALLOCATOR_USE_BFC: TensorFlow's default CPU allocator hands large
buffers back to the operating system after every step and takes them
again on the next one, so a training step spends as much time in page
faults as in arithmetic. The BFC allocator keeps them in a pool. It also
tracks the peak memory that the benchmarks report
(`tf.config.experimental.get_memory_info`).
"""

import os

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
