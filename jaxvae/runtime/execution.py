"""How jaxvae runs on the machine at hand: the one place that asks for the backend.

The maths (model, losses, predictors, projection, train step) is written once and never
asks where it runs. What differs between backends is only how the work is scheduled, and
that is decided here, once, and handed to the scorer (jaxvae.runtime.batching), the trainer and the
benchmark harness:

* convolution forms (jaxvae.core.convs): XLA:CPU runs dilated convolutions on a slow generic
  kernel, so on CPU training uses "s2d" and the maps / projection "cpu_inference";
  cuDNN and TPUs handle strides and dilation natively ("lax");
* chunk size: on CPU a batch of 64 keeps one pass's activations in cache, so larger
  batches are scored in 64-image chunks; accelerators want the whole batch;
* micro-batches: the train step's gradient on CPU is summed over 32-image pieces inside
  the one compiled step (a sharded batch over several devices is one piece);
* both hold 64x64 images; `for_model` scales them to a model's image size, so a chunk or
  piece holds the same pixels (16 and 8 images at 128x128);
* the projection's schedule: on XLA:CPU the body of a while loop runs slower than the
  same ops at the top level of a program, so on CPU the Adam steps run as a Python loop
  over a compiled program of 10 unrolled steps; elsewhere one compiled `fori_loop`.

The figures behind each choice are in the README (Performance) and come from
`jaxvae bench`.
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """Per-backend scheduling choices; none of them changes a result beyond float rounding.

    Attributes:
      train_conv: the ConvVAE `conv_impl` for training (parameter gradients).
      inference_conv: the `conv_impl` for anomaly maps and the projection (input gradients).
      chunk_size: 64x64 images per compiled call of the maps and the projection (see
        `for_model` for other sizes); 0 = the batch.
      micro_batch: 64x64 images per piece of the train step's gradient; 0 = the batch.
      projection_unroll: > 0: the projection runs as a Python loop over a compiled program
        of this many unrolled Adam steps; 0: one compiled `fori_loop` for all steps.
    """

    train_conv: str = "lax"
    inference_conv: str = "lax"
    chunk_size: int = 0
    micro_batch: int = 0
    projection_unroll: int = 0

    def training_model(self, model):
        """`model` with the convolution form for training."""
        return model.clone(conv_impl=self.train_conv)

    def inference_model(self, model):
        """`model` with the convolution form for the maps and the projection."""
        return model.clone(conv_impl=self.inference_conv)

    def for_model(self, model):
        """The policy for a model's image size: chunk_size and micro_batch count 64x64
        images, so at S x S they shrink by (64 / S)**2 (at least 1; 0 stays 0)."""
        f = (model.image_size // 64) ** 2

        def scale(n):
            return max(1, n // f) if n else 0
        return dataclasses.replace(self, chunk_size=scale(self.chunk_size),
                                   micro_batch=scale(self.micro_batch))

    def sharded(self):
        """The policy for a batch split over several devices: one call, no pieces."""
        return dataclasses.replace(self, chunk_size=0, micro_batch=0)


CPU = ExecutionPolicy(train_conv="s2d", inference_conv="cpu_inference", chunk_size=64,
                      micro_batch=32, projection_unroll=10)
ACCELERATOR = ExecutionPolicy()
PLAIN = ExecutionPolicy()  # the textbook forms, no scheduling: for tests and references


def policy_for(backend: str) -> ExecutionPolicy:
    """The policy of a backend name ("cpu", "gpu", "tpu", ...)."""
    return CPU if backend == "cpu" else ACCELERATOR


def backend() -> str:
    """The default backend of this process ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


def current() -> ExecutionPolicy:
    """The policy of the default backend of this process."""
    return policy_for(backend())
