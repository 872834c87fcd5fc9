// A small stdlib-only Go upload backend with the two handlers unpart's users have:
//
//	/raw        reads the raw request body, as a backend behind unpart does (fields arrive
//	            as X-Form-* headers, the file as the body)
//	/multipart  the legacy handler: r.ParseMultipartForm + r.FormFile, which buffers the
//	            file in memory (up to maxMemory) and on disk beyond it
//
// Both count the file's bytes and answer {"bytes":N}. Used by benches/memory_chart.sh to
// draw RSS over time; run it by hand with:
//
//	go run ./examples/go-backend -listen 127.0.0.1:8081
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"strings"
)

func raw(w http.ResponseWriter, r *http.Request) {
	name, _ := url.PathUnescape(r.Header.Get("X-File-Name"))
	fields := 0
	for k := range r.Header {
		if strings.HasPrefix(k, "X-Form-") {
			fields++
		}
	}
	n, err := io.Copy(io.Discard, r.Body)
	if err != nil { // the upload broke off: nothing to keep
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"bytes\":%d,\"file\":%q,\"fields\":%d}\n", n, name, fields)
}

func legacy(maxMemory int64) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseMultipartForm(maxMemory); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		defer r.MultipartForm.RemoveAll()
		f, h, err := r.FormFile("file")
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		defer f.Close()
		n, err := io.Copy(io.Discard, f)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, "{\"bytes\":%d,\"file\":%q,\"fields\":%d}\n", n, h.Filename, len(r.MultipartForm.Value))
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "address to serve on")
	maxMemory := flag.Int64("max-memory", 32<<20, "ParseMultipartForm's maxMemory for /multipart")
	flag.Parse()
	http.HandleFunc("/raw", raw)
	http.HandleFunc("/multipart", legacy(*maxMemory))
	log.Printf("go-backend on %s: /raw and /multipart", *listen)
	log.Fatal(http.ListenAndServe(*listen, nil))
}
