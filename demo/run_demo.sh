#!/usr/bin/env bash
# The main job on demo data: simulate two small cryo-SXT tomograms, segment them with the shipped
# weights, then make surfaces, measurements and pictures. Usage: bash demo/run_demo.sh [OUTPUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-demo_output}")"
cd "$root"

echo "== 1/3 simulating two tomograms (32 x 192 x 192, 9.8 nm voxels) into $out/data"
python -m cryosxt_sim --out "$out/data" --count 2 --shape 32,192,192 --seed 7 \
    --tilt_step_deg 2

echo "== 2/3 segmenting with bundle/models/model.pt"
python -m monai.bundle run inference --config_file bundle/configs/inference.json \
    --dataset_dir "$out/data/images" --output_dir "$out/segmentations" --probability uint8

echo "== 3/3 surfaces, measurements and pictures"
python -m monai.bundle run surfaces --config_file bundle/configs/surfaces.json \
    --dataset_dir "$out/segmentations" --pattern "*_mask.mrc" --image_dir "$out/data/images" \
    --output_dir "$out/surfaces" --min_voxels 50

echo
echo "Masks (MRC and ImageJ TIFF, open in Fiji or MIB):  $out/segmentations"
echo "Per-tomogram summary:                              $out/segmentations/summary.csv"
echo "Surfaces, measurements (CSV) and pictures (PNG):   $out/surfaces"
find "$out/surfaces" -name "*.png" | sort | sed 's/^/  picture: /'
