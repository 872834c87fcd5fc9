module unpart/examples/go-backend

go 1.19
