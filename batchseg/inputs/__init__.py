"""What a job reads, in the order it reads it: URIs → rows of images → decoded pixels.

- `names`: the file endings that make an image, a tar shard or a manifest, and `InputError`.
- `sources`: what each input URI is (`classify`), listing folders as streams of pages
  (`iter_listing`, `split_folder`), tar shards and their members (`iter_shard`, `split_member`).
- `manifests`: URI lists (Parquet, CSV, JSON lines) and S3 Inventory, read as parallel parts.
- `imaging`: bytes → RGB arrays (EXIF orientation applied, decompression bombs refused), and
  JPEG decoding on the device.

May import: batchseg.config, batchseg.errors. Nothing else of batchseg.
"""
