"""The one reader of data files: the IDX family (``idx``) and the MNIST variants
regenerated from it (``variants``), a user's ``.npz`` (``npz``) or table (``tables``), the
rules every file passes (``checks``, ``labels``), sizes and shapes read for the checks
before start-up (``headers``), and the way in for the data stage (``read``)."""
