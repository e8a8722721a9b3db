"""The book's LeNet-5 recipe in Keras 3 on TensorFlow, as a speed and accuracy peer.

The same network (conv 6@5x5 same -> sigmoid -> avg-pool -> conv 16@5x5 -> sigmoid ->
avg-pool -> dense 120 -> 84 -> 10, Glorot-uniform = Xavier-uniform weights, zero biases),
the same data (the IDX files, x / 255), batch 128, SGD lr 0.9, cross-entropy on logits,
test accuracy after every epoch: Keras's own `fit` on in-memory arrays, as a Keras user
would write it, with TensorFlow's oneDNN kernels on (its fastest setting here; see below).
Needs tensorflow (and keras 3); run it with the interpreter that has them:

    python keras_loop.py [--epochs 10] [--lr 0.9] [--batch-size 128] [--data DIR]
                         [--jit-compile auto|true|false]

Prints one line per epoch and, last, a JSON line in the format of book_loop.py:
  {"peer": "keras", "test_acc": .., "train_examples_per_s": .., "epoch_seconds": [..], ..}
train_examples_per_s is over the training loop (`fit` for one epoch, data included).
"""
import json
import os
import time

T0 = time.time()

import peer_data  # noqa: E402 - after T0: the wall time counts imports, as book_loop.py

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no start-up chatter on stderr
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow leaves its oneDNN kernels off on this (AMD) CPU; on, its steps run ~2.4x faster
# here (2 epochs: 6.8-7.6k examples/s against 2.8-3.3k). The peer gets its best setting.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def split(root, prefix):
    images, labels = peer_data.split(root, prefix)
    return images[..., None], labels


def lenet():
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(6, 5, padding="same", activation="sigmoid"),
        layers.AveragePooling2D(2, 2),
        layers.Conv2D(16, 5, activation="sigmoid"),
        layers.AveragePooling2D(2, 2),
        layers.Flatten(),
        layers.Dense(120, activation="sigmoid"),
        layers.Dense(84, activation="sigmoid"),
        layers.Dense(10),
    ])


def main():
    p = peer_data.parser()
    p.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                   help="Keras's compile(jit_compile=...): XLA for the train step")
    a = p.parse_args()
    keras.utils.set_random_seed(a.seed)
    x_train, y_train = split(a.data, "train")
    x_test, y_test = split(a.data, "t10k")
    net = lenet()
    assert net.count_params() == 61_706, net.count_params()
    net.compile(optimizer=keras.optimizers.SGD(a.lr),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                jit_compile={"auto": "auto", "true": True, "false": False}[a.jit_compile])
    loop_time, seen, epoch_s = 0.0, 0, []
    for epoch in range(a.epochs):
        t = time.time()
        h = net.fit(x_train, y_train, batch_size=a.batch_size, epochs=1, shuffle=True,
                    verbose=0)
        loop = time.time() - t
        loop_time += loop
        seen += len(y_train)
        _, test_acc = net.evaluate(x_test, y_test, batch_size=a.batch_size, verbose=0)
        epoch_s.append(time.time() - t)
        print(f"epoch {epoch + 1}: loss {h.history['loss'][0]:.3f}, train acc "
              f"{h.history['accuracy'][0]:.3f}, test acc {test_acc:.3f}, "
              f"{len(y_train) / loop:.0f} examples/s", flush=True)
    print(json.dumps({
        "peer": "keras", "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size,
        "test_acc": round(float(test_acc), 4),
        "train_examples_per_s": round(seen / loop_time, 1),
        "epoch_seconds": [round(s, 2) for s in epoch_s],
        "wall_s": round(time.time() - T0, 2), "keras": keras.__version__,
        "tensorflow": tf.__version__}))


if __name__ == "__main__":
    main()
