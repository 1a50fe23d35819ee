#!/usr/bin/env bash
# Builds (and with --push, pushes) the service images from deploy/docker/*.Dockerfile:
#
#   REGISTRY/rlhf-policy:VERSION-cpu    REGISTRY/rlhf-policy:VERSION-cuda
#   REGISTRY/rlhf-trainer:VERSION-cpu   REGISTRY/rlhf-trainer:VERSION-cuda
#   REGISTRY/rlhf-reward:VERSION-cpu    REGISTRY/rlhf-gateway:VERSION-cpu
#
# VERSION is rlhf/__init__.py's __version__ unless --tag says otherwise. The build context is the
# repository's files that git tracks or would track (a tar of `git ls-files`), so .venv/, runs and
# caches never reach the daemon. Needs docker with BuildKit (or podman: --tool podman).
#
#   scripts/build_images.sh                                   # everything, local tags only
#   scripts/build_images.sh --registry localhost:5001 --push  # for the dev-cpu overlay
#   scripts/build_images.sh --registry registry.example.com/rlhf --variant cuda --push
#   scripts/build_images.sh --dry-run                         # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=""
TAG=""
VARIANT=all
PUSH=0
DRY_RUN=0
TOOL=${CONTAINER_TOOL:-docker}
SERVICES=(policy trainer reward gateway)

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case $1 in
    --registry) REGISTRY=${2%/}; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --variant) VARIANT=$2; shift 2 ;;
    --service) SERVICES=("$2"); shift 2 ;;
    --push) PUSH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --tool) TOOL=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $VARIANT in all|cpu|cuda) ;; *) echo "--variant must be all, cpu or cuda" >&2; exit 2 ;; esac
if [[ -z $TAG ]]; then
  TAG=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' rlhf/__init__.py)
  [[ -n $TAG ]] || { echo "cannot read __version__ from rlhf/__init__.py" >&2; exit 1; }
fi

# The variants each service's Dockerfile builds (its stage names).
variants_of() {
  case $1 in
    policy|trainer) echo "cpu cuda" ;;
    reward|gateway) echo "cpu" ;;
    *) echo "unknown service: $1" >&2; exit 2 ;;
  esac
}

run() {
  printf '+ %s\n' "$*"
  ((DRY_RUN)) || "$@"
}

context_tar() {
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -
}

for service in "${SERVICES[@]}"; do
  for variant in $(variants_of "$service"); do
    [[ $VARIANT == all || $VARIANT == "$variant" ]] || continue
    image="rlhf-$service:$TAG-$variant"
    [[ -n $REGISTRY ]] && image="$REGISTRY/$image"
    dockerfile="deploy/docker/$service.Dockerfile"
    printf '+ %s | %s\n' "context_tar" \
      "$TOOL build -f $dockerfile --target $variant -t $image -"
    if ((!DRY_RUN)); then
      context_tar | DOCKER_BUILDKIT=1 "$TOOL" build -f "$dockerfile" --target "$variant" \
        -t "$image" -
    fi
    if ((PUSH)); then
      run "$TOOL" push "$image"
    fi
  done
done
