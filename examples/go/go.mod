module github.com/nexus/data-service/examples/go

go 1.19

require (
	github.com/nexus/data-service/gen/go v0.0.0
	google.golang.org/genproto v0.0.0-20200526211855-cb27e3aa2013
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)

// The generated client of this repository (gen/go), not a published version.
replace github.com/nexus/data-service/gen/go => ../../gen/go
