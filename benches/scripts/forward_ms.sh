# shellcheck shell=bash
# Sourced by the scripts beside it. `forward_ms NET KIND BATCH N ENGINE` runs
# examples/profile_infer and prints the median (STAT=min: the minimum) of its last N/2 forwards
# in milliseconds.
forward_bin="${CARGO_TARGET_DIR:-target}/release/examples/profile_infer"
forward_stat="${STAT:-median}"
case "$forward_stat" in median | min) ;; *) echo "STAT must be median or min, not '$forward_stat'" >&2; exit 2 ;; esac

forward_ms() {
    "$forward_bin" "$1" "$2" "$3" "$4" "$5" | tail -n $(($4 / 2)) | awk '{
        v = $2
        if (v ~ /µs$/) { sub("µs", "", v); v /= 1000 } else if (v ~ /ms$/) { sub("ms", "", v) }
        else if (v ~ /s$/) { sub("s", "", v); v *= 1000 }
        print v }' | sort -n | awk -v stat="$forward_stat" '{ a[NR] = $1 }
        END { print (stat == "min") ? a[1] : a[int((NR + 1) / 2)] }'
}
