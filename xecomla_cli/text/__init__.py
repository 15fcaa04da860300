"""Where text comes from: documents of a data source (``documents``), the bundled demo packages
(``bundled``), tokenised and packed blocks (``packing``), text sampled from the teacher
(``teacher``) and the calibration text of ``init-svd`` (``calibration``)."""
