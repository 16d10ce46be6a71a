# %% [markdown]
# # Lab A: a JAX primer (appendix A, in JAX instead of PyTorch)
#
# The book's appendix A teaches just enough PyTorch to build an LLM. This lab covers the same
# ground in JAX: arrays, automatic differentiation with `grad`, compilation with `jit`,
# vectorisation with `vmap`, explicit random keys, pytrees, and then the appendix's small
# classifier trained twice: once as pure functions over a params pytree (the style of
# `gptflax/`), once as a Flax NNX module (the style closest to `torch.nn.Module`). It ends with
# A.9.3's training on several devices, on 8 CPU devices simulated by this machine.

# %%
print("\n# A.2 Arrays: JAX's tensors")
import jax

jax.config.update("jax_num_cpu_devices", 8)  # for A.9.3; JAX wants it before its first array
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptflax import models, nn

np.set_printoptions(precision=4, suppress=True)  # 4 digits, as the book prints

tensor0d = jnp.array(1)
tensor1d = jnp.array([1, 2, 3])
tensor2d = jnp.array([[1, 2], [3, 4]])
tensor3d = jnp.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
print(tensor1d.dtype, jnp.array([1.0, 2.0, 3.0]).dtype)  # int32 float32: JAX defaults to 32 bits
t = jnp.array([[1, 2, 3], [4, 5, 6]])
print(t.shape, t.reshape(3, 2).shape, t.T.shape)
print(t @ t.T)  # (2, 3) @ (3, 2) -> (2, 2)
# JAX arrays are immutable: instead of t[0, 0] = 9, write an updated copy.
t9 = t.at[0, 0].set(9)
print(t[0, 0], t9[0, 0])

# %%
print("\n# A.3-A.4 A computation graph, and its gradients with `jax.grad`")
# The appendix's logistic-regression forward pass: z = x1 * w1 + b, a = sigmoid(z).
y, x1 = 1.0, 1.1


def logistic_loss(w1, b):
    a = jax.nn.sigmoid(x1 * w1 + b)
    return -(y * jnp.log(a) + (1 - y) * jnp.log(1 - a))  # binary cross-entropy


w1, b = 2.2, 0.0
grad_w1, grad_b = jax.grad(logistic_loss, argnums=(0, 1))(w1, b)
print(f"loss {logistic_loss(w1, b):.4f}  dL/dw1 {grad_w1:.4f}  dL/db {grad_b:.4f}")
# By hand: dL/dz = a - y, so dL/dw1 = (a - y) * x1 and dL/db = a - y.
a = jax.nn.sigmoid(x1 * w1 + b)
print(f"by hand:        dL/dw1 {(a - y) * x1:.4f}  dL/db {a - y:.4f}")


# %%
print("\n# `jit` compiles a whole function with XLA; `vmap` maps a function over a batch axis")


@jax.jit
def affine(w, x, b):
    return w @ x + b


w = jax.random.normal(jax.random.key(0), (3, 4))
xs = jax.random.normal(jax.random.key(1), (5, 4))
batched = jax.vmap(affine, in_axes=(None, 0, None))(w, xs, 1.0)  # one call per row of xs
print("vmap:", batched.shape, "equals xs @ w.T + 1:", bool(jnp.allclose(batched, xs @ w.T + 1.0)))

# %%
print("\n# Random numbers: explicit, typed keys instead of a global seed")
key = jax.random.key(123)
k1, k2 = jax.random.split(key)  # never reuse a key: split it into new ones
print(jax.random.uniform(k1, (3,)), jax.random.uniform(k1, (3,)))  # same key -> same numbers
print(jax.random.uniform(k2, (3,)))  # a different key -> different numbers

# %%
print("\n# Pytrees: nested dicts/lists/tuples of arrays, the way JAX holds model parameters")
tree = {"layer1": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "scale": jnp.ones(())}
print(jax.tree.map(jnp.shape, tree))
print("leaves:", len(jax.tree.leaves(tree)), "numbers:", sum(x.size for x in jax.tree.leaves(tree)))

# %%
print("\n# A.5 A multilayer network as pure functions over a params pytree")
# NeuralNetwork(num_inputs, num_outputs): 2 hidden layers of 30 and 20 units with ReLU.
SIZES = (30, 20)


def init_mlp(key, num_inputs, num_outputs):
    dims = (num_inputs, *SIZES, num_outputs)
    keys = jax.random.split(key, len(dims) - 1)
    return [
        nn.init_linear(k, d_in, d_out)
        for k, d_in, d_out in zip(keys, dims[:-1], dims[1:], strict=True)
    ]


def mlp(params, x):  # (B, num_inputs) -> (B, num_outputs) logits
    for layer in params[:-1]:
        x = jax.nn.relu(nn.linear(layer, x))
    return nn.linear(params[-1], x)


def count_params(params):
    return sum(x.size for x in jax.tree.leaves(params))


params_50_3 = init_mlp(jax.random.key(123), 50, 3)
print("NeuralNetwork(50, 3) trainable parameters:", count_params(params_50_3))
print("output for one random input:", mlp(params_50_3, jax.random.uniform(k1, (1, 50))))


# %%
print("\n# A.5 The same network as a Flax NNX module: objects that own their parameters")


class NeuralNetwork(nnx.Module):
    def __init__(self, num_inputs: int, num_outputs: int, *, rngs: nnx.Rngs):
        self.layers = nnx.Sequential(
            nnx.Linear(num_inputs, 30, rngs=rngs),
            jax.nn.relu,
            nnx.Linear(30, 20, rngs=rngs),
            jax.nn.relu,
            nnx.Linear(20, num_outputs, rngs=rngs),
        )

    def __call__(self, x):
        return self.layers(x)


nnx_50_3 = NeuralNetwork(50, 3, rngs=nnx.Rngs(123))
nnx_count = sum(p.size for p in jax.tree.leaves(nnx.state(nnx_50_3, nnx.Param)))
print("NNX NeuralNetwork(50, 3) trainable parameters:", nnx_count)

# %%
print("\n# A.6 The appendix's toy data and a seeded loader")
from gptflax.data import DataLoader

X_train = np.array([[-1.2, 3.1], [-0.9, 2.9], [-0.5, 2.6], [2.3, -1.1], [2.7, -1.5]], np.float32)
y_train = np.array([0, 0, 0, 1, 1])
X_test = np.array([[-0.8, 2.8], [2.6, -1.6]], np.float32)
y_test = np.array([0, 1])
train_loader = DataLoader(X_train, y_train, batch_size=2, shuffle=True, drop_last=True, seed=123)
print("batches per epoch:", len(train_loader))  # 5 examples, batch 2, drop_last -> 2

# %%
print("\n# A.7 Training, functional style: jit a pure step, optax updates the params")
NUM_EPOCHS, LR = 3, 0.5
tx = optax.sgd(LR)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def train_step(params, opt_state, x, labels):
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(mlp(p, x), labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = init_mlp(jax.random.key(123), 2, 2)
opt_state = tx.init(params)
for epoch in range(NUM_EPOCHS):
    for features, labels in train_loader:
        params, opt_state, loss = train_step(params, opt_state, features, labels)
    print(f"functional epoch {epoch + 1}/{NUM_EPOCHS}  last batch loss {loss:.2f}")


def accuracy(predict, X, y):
    return float((predict(X).argmax(-1) == y).mean())


acc_fn = (
    accuracy(lambda x: mlp(params, x), X_train, y_train),
    accuracy(lambda x: mlp(params, x), X_test, y_test),
)
print("functional accuracy train/test:", acc_fn)

# %%
print("\n# A.7 Training, NNX style: the optimizer updates the module in place")
model = NeuralNetwork(2, 2, rngs=nnx.Rngs(123))
optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)


@nnx.jit
def nnx_train_step(model, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), labels))(model)
    optimizer.update(model, grads)
    return loss


train_loader.set_epoch(0)  # the same batches in the same order as above
for epoch in range(NUM_EPOCHS):
    for features, labels in train_loader:
        loss = nnx_train_step(model, optimizer, features, labels)
    print(f"NNX epoch {epoch + 1}/{NUM_EPOCHS}  last batch loss {loss:.2f}")
acc_nnx = accuracy(model, X_train, y_train), accuracy(model, X_test, y_test)
print("NNX accuracy train/test:", acc_nnx)

# %%
print("\n# A.9.3 Training on several devices: data parallel, FSDP, tensor parallel")
# The book splits each batch over GPUs with PyTorch's DistributedDataParallel. In JAX the same
# program runs on a mesh of devices: arrays carry a sharding (which device holds which part) and
# `jax.jit` compiles one program that computes on every part and exchanges what is needed. The
# batch is split over the mesh's "data" axis; the strategy says where the weights live: a copy
# on every device (dp, the book's DDP), split over "data" (fsdp: each device holds 1/N of the
# weights and of the optimizer state) or split over "model" (tp: each device computes its share
# of the heads and hidden units). Here 8 CPU devices share this machine's cores, so the speed
# shows what the exchanges cost, not what 8 GPUs would gain.
import time
from functools import partial

from gptflax import parallel
from gptflax.config import GPT2_PRESETS, TINY
from gptflax.losses import loss_fn
from gptflax.training import init_train_state, make_optimizer
from gptflax.training import train_step as gpt_train_step

cpus = jax.devices("cpu")
STRATEGIES = {"dp": {"data": 8}, "fsdp": {"data": 8}, "tp": {"model": 8, "data": 1}}
STRATEGIES["fsdp+tp"] = {"data": 4, "model": 2}

print("bytes per device of the weights and AdamW's state (from shapes; nothing allocated):")
print(f"{'model':>6} " + "".join(f"{s:>10}" for s in STRATEGIES))
memory = {}
for size in ("124M", "1558M"):
    big = GPT2_PRESETS[size]
    shapes = jax.eval_shape(
        lambda cfg=big: init_train_state(
            models.init_params(jax.random.key(0), cfg), make_optimizer()
        )
    )
    memory[size] = {
        name: parallel.bytes_per_device(shapes, big, parallel.make_mesh(devices=cpus, **m), name)
        for name, m in STRATEGIES.items()
    }
    print(f"{size:>6} " + "".join(f"{b / 2**30:>7.2f}GiB" for b in memory[size].values()))

cfg = TINY.replace(vocab_size=512, drop_rate=0.1)
tx = make_optimizer(1e-3)
step = partial(gpt_train_step, loss=partial(loss_fn, cfg=cfg), tx=tx)
rng = np.random.default_rng(0)
x = rng.integers(0, cfg.vocab_size, (16, cfg.context_length), dtype=np.int32)
batch, key = (x, np.roll(x, -1, axis=1)), jax.random.key(0)
state0 = init_train_state(models.init_params(jax.random.key(0), cfg), tx)


def three_steps(step_fn, state, batch):
    """Losses of three steps, and the seconds per step once compiled."""
    losses = []
    for _ in range(3):
        state, metrics = step_fn(state, batch, key)
        losses.append(float(metrics["loss"]))
    start = time.perf_counter()
    jax.block_until_ready(step_fn(state, batch, key))
    return np.array(losses), time.perf_counter() - start


single_losses, single_s = three_steps(jax.jit(step), state0, batch)
print(f"\none device: losses {single_losses.round(4)}, {single_s * 1e3:.1f} ms per step")
results = {}
for name, sizes in STRATEGIES.items():
    mesh = parallel.make_mesh(16, devices=cpus, **sizes)
    state, step_fn = parallel.jit_sharded(step, state0, cfg, mesh, name)
    kernel = state.params["trf_blocks"]["ff"]["fc1"]["kernel"]  # (L, D, 4D)
    results[name] = three_steps(step_fn, state, parallel.shard_batch(batch, mesh))
    print(
        f"{name:>8} on {dict(mesh.shape)}: fc1 kernel {kernel.shape} held as "
        f"{kernel.sharding.shard_shape(kernel.shape)} per device, losses "
        f"{results[name][0].round(4)}, {results[name][1] * 1e3:.1f} ms per step"
    )
# Several hosts run the same script, each after parallel.initialize(...): see the README's
# "Training on many devices" for the launch commands (python -m gptflax train --strategy fsdp).

# %%
print("\n# Checks")
assert tensor3d.shape == (2, 2, 2) and t9[0, 0] == 9 and t[0, 0] == 1
assert abs(grad_w1 - (a - y) * x1) < 1e-6 and abs(grad_b - (a - y)) < 1e-6
assert round(float(grad_w1), 4) == -0.0898 and round(float(grad_b), 4) == -0.0817  # appendix A.4
assert count_params(params_50_3) == 2213 and nnx_count == 2213  # appendix A.5
assert len(train_loader) == 2
assert acc_fn == (1.0, 1.0), acc_fn  # appendix A.7: every train and test example right
assert acc_nnx == (1.0, 1.0), acc_nnx
for size, held in memory.items():  # FSDP over 8 devices: 1/8 of the weights and Adam's state each
    assert held["fsdp"] < held["dp"] / 7.9, (size, held)
    assert held["fsdp+tp"] < held["tp"], (size, held)
for name, (losses, _) in results.items():  # every strategy computes the one-device steps
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5, err_msg=name)
print("lab A: all checks passed")
