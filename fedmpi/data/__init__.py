"""Datasets, partitions and client shards.

Only rank 0 loads a dataset (:func:`load`); it partitions the training split
(:func:`partition`) and the transport sends every client rank the samples of the clients
it owns, so a client rank holds only its own clients' data and never imports torchvision.
Rank 0 reads the image files itself (numpy: IDX files, pickled CIFAR batches), the files
torchvision's loaders read, to the same arrays; importing torchvision (~160 MiB resident:
sympy, PIL, torch._dynamo, ...) happens only to download (``data.download = true``).
Samples stay in their storage dtype (uint8 for images, channels first) until a batch is
drawn; :class:`Normalizer` turns a batch into normalised float32 on the rank's device, and
:class:`Augmenter` (``data.augment``, CIFAR only) crops and flips a batch there first.

Datasets (the image sets are read from ``data.root`` or ``$FEDMPI_DATA_ROOT`` in
torchvision's on-disk layout; torchvision downloads them only if ``data.download = true``)
  ``synthetic``  Synthetic(alpha, beta) of FedProx (Li et al., "Federated Optimization in
                 Heterogeneous Networks", MLSys 2020), the LEAF generator: client k has
                 W_k, b_k ~ N(u_k, 1), u_k ~ N(0, alpha); x ~ N(v_k, diag(j^-1.2)),
                 v_k ~ N(B_k, 1), B_k ~ N(0, beta); y = argmax softmax(W_k x + b_k);
                 n_k = lognormal(4, 2) + syn_min_samples (capped at syn_max_samples, a
                 fedmpi addition: the uncapped tail reaches 10^5 samples). Each client's
                 samples are split train/test by ``syn_test_frac``; the test set is the union
                 of the held-out parts. Partition ``natural`` keeps each client's own data.
  ``mnist``      MNIST, ``<root>/MNIST/raw/``: 1x28x28, 10 classes.
  ``fmnist``     Fashion-MNIST, ``<root>/FashionMNIST/raw/``: 1x28x28, 10 classes.
  ``emnist``     EMNIST, ``<root>/EMNIST/raw/``, split ``data.emnist_split``: byclass (62
                 classes, the 3SFC default), bymerge (47), balanced (47), letters (26; the
                 files' labels 1..26 become 0..25), digits (10), mnist (10). Images as
                 stored in the files, as torchvision returns them (transposed relative to
                 MNIST, as in 3SFC).
  ``cifar10``    CIFAR-10, ``<root>/cifar-10-batches-py/``: 3x32x32, 10 classes.
  ``cifar100``   CIFAR-100, ``<root>/cifar-100-python/``: 3x32x32, 100 (fine) classes.
  The MNIST family is only scaled to [0, 1] (as 3SFC's ``ToTensor``); CIFAR is then
  normalised per channel with the 3SFC code's mean/std (CIFAR-10: (0.4914, 0.4822, 0.4465)
  / (0.2023, 0.1994, 0.2010); CIFAR-100: (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565,
  0.2761)). The test split is the official test set, unless ``data.train_frac`` < 1: then
  (3SFC's protocol) the train split is shuffled and its first ``train_frac`` share is the
  training set, the rest the test set. ``max_train`` / ``max_test`` keep a random subset
  (3SFC's EMNIST: 50,000 / 10,000). CIFAR batch files are checked against torchvision's
  md5 sums unless ``data.check_md5 = false``.

Partitions (all driven by an explicit ``numpy.random.Generator``; docs/algorithms.md section 6)
  ``natural``    the generator's own clients (synthetic only).
  ``iid``        a uniform random split into near-equal parts.
  ``dirichlet``  (variant A) per-class Dirichlet over clients, as 3SFC's ``split_noniid``:
                 for every class c, p_c ~ Dir(alpha 1_N) and the shuffled class indices are
                 cut at cumsum(p_c) n_c. Client sizes are unequal; no minimum size.
  ``dirichlet_balanced``  (variant B, NIID-Bench, Li et al., ICDE 2022) as ``dirichlet``,
                 but before normalising p_c the share of every client that already holds
                 >= n/N samples is zeroed, and the whole draw is repeated until every client
                 has at least ``data.min_size`` samples (at most 1000 draws).
  ``client_dirichlet``  (variant C, FL-Simulator) client i draws a class mixture
                 q_i ~ Dir(alpha 1_C) and its n/N class labels i.i.d. from q_i (equal client
                 sizes). Each class's demands, in random order, take the class's shuffled
                 samples in turn and wrap around when demand exceeds supply, as
                 FL-Simulator refills an exhausted class: this variant may repeat samples
                 (and then leaves others unused); the other partitions use every sample
                 exactly once.
  ``shards``     pathological non-IID: every client holds ``data.classes_per_client`` = c
                 distinct classes, chosen client by client among the classes held by the
                 fewest clients so far (random ties), so every class is held and holder
                 counts differ by at most one; each class's shuffled samples are split
                 evenly among its holders.
"""

from fedmpi import registry
from fedmpi.data.arrays import (
    TAG_AUGMENT,
    TAG_DATA,
    TAG_HOLDOUT,
    TAG_PARTITION,
    TAG_SPLIT,
    ArrayDataset,
    DataError,
    DatasetInfo,
    LoadedData,
)
from fedmpi.data.datasets import AUGMENTABLE, DATASETS, DatasetEntry, info, load, resplit
from fedmpi.data.partitions import (
    MAX_REDRAWS,
    PARTITIONS,
    REPEATING,
    class_counts,
    hold_out,
    partition,
)
from fedmpi.data.readers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_FILES,
    EMNIST_CLASSES,
    IDX_FILES,
    CifarFiles,
    data_root,
    file_md5,
    read_cifar_batches,
    read_idx,
)
from fedmpi.data.synthetic import (
    available_memory,
    check_synthetic_size,
    synthetic_bytes,
    synthetic_client,
)
from fedmpi.data.transforms import Augmenter, Normalizer, augmenter

# the names fedmpi.config accepts, and the shapes it checks a model against
registry.provide(datasets=DATASETS, partitions=PARTITIONS, augmentable=AUGMENTABLE,
                 dataset_info=info)

__all__ = [
    "AUGMENTABLE", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_FILES",
    "DATASETS", "EMNIST_CLASSES", "IDX_FILES", "MAX_REDRAWS", "PARTITIONS", "REPEATING",
    "TAG_AUGMENT", "TAG_DATA", "TAG_HOLDOUT", "TAG_PARTITION", "TAG_SPLIT", "ArrayDataset",
    "Augmenter", "CifarFiles", "DataError", "DatasetEntry", "DatasetInfo", "LoadedData",
    "Normalizer", "augmenter", "available_memory", "check_synthetic_size", "class_counts",
    "data_root", "file_md5", "hold_out", "info", "load", "partition", "read_cifar_batches",
    "read_idx", "resplit", "synthetic_bytes", "synthetic_client",
]
