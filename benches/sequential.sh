#!/usr/bin/env bash
# The baseline of the pipeline benchmark: the same work as vidpipe's stages,
# one video after another, as a plain script would do it: download (curl),
# audio extraction (ffmpeg, 16 kHz mono), transcription (the ASR server).
# Usage: sequential.sh ASR_URL WORKDIR URL...
set -euo pipefail
asr="$1"; work="$2"; shift 2
i=0
for url in "$@"; do
    i=$((i + 1))
    curl -sSf -o "$work/v$i.mp4" -- "$url"
    ffmpeg -loglevel error -nostdin -y -i "file:$work/v$i.mp4" -vn -ac 1 -ar 16000 "$work/v$i.wav"
    curl -sSf -o "$work/v$i.json" -F "file=@$work/v$i.wav" -F model=whisper-1 -F model_name=whisper-1 \
        -F response_format=verbose_json "$asr/audio/transcriptions"
done
