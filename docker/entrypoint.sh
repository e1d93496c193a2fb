#!/bin/sh
# Lay out ./kit as fedvault expects it, then run `fedvault "$@"`: the kit's files from the
# read-only mount /mnt/kit, and its state/ folder on the writable volume /var/lib/fedvault
# (the site's privacy ledger, logs, the SuperLink's database).
set -eu
if [ -e /mnt/kit/kit.toml ]; then
    mkdir -p "$HOME/kit"
    for entry in /mnt/kit/*; do
        [ "${entry##*/}" = state ] || ln -sfn "$entry" "$HOME/kit/"
    done
    ln -sfn /var/lib/fedvault "$HOME/kit/state"
fi
exec fedvault "$@"
